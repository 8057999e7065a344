"""Admission through PBFT with real daemons (issue 13): a node added with ``dwcp cluster
add-node`` on one member starts receiving gossip and is alive at the others; after
``cluster remove-node`` on another member it is told nothing and its datagrams are dropped.

Nodes a and b host replicas 0 and 1 of a 4-replica cluster (2 and 3 are plain replica
processes) and bootstrap with a ``gossip.toml`` naming only a and b. Node c has no
``[consensus]``; its own ``gossip.toml`` names a, b and c, so it gossips at them from the
start and is dropped as not_admitted until the member table admits it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node.cluster import ENV, PY, NodeProc, free_udp_port, init_cluster, wait_until

from dwcp.identity import NodeKey
from dwcp.node import control
from dwcp.node.config import load_config

PERIOD = 0.5


def gossip_toml(me: NodeProc, ports: dict[str, int], members: list[NodeProc]) -> None:
    text = f'listen = "127.0.0.1:{ports[me.name]}"\nperiod = {PERIOD}\nadmission_poll = 0.5\n'
    for n in members:
        text += f'\n[[members]]\nname = "{n.name}"\nkey = "{n.pubkey}"\n'
        text += f'address = "127.0.0.1:{ports[n.name]}"\n'
    (me.dir / "gossip.toml").write_text(text)


def members(n: NodeProc) -> dict[str, Any]:
    return dict(control.call(load_config(n.config).control_path, "members", timeout=10))


def states(n: NodeProc) -> dict[str, str]:
    return {r["name"]: r["state"] for r in members(n)["members"] if not r["self"]}


def heard_alive(n: NodeProc, other: str) -> bool:
    row = next((r for r in members(n)["members"] if r["name"] == other), None)
    return row is not None and row["state"] == "alive" and row["heard_s"] is not None


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.a, self.b, self.c = (NodeProc(root, x) for x in "abc")
        self.ports = {n.name: free_udp_port() for n in (self.a, self.b, self.c)}
        gossip_toml(self.a, self.ports, [self.a, self.b])
        gossip_toml(self.b, self.ports, [self.a, self.b])
        gossip_toml(self.c, self.ports, [self.a, self.b, self.c])
        others = [NodeKey.generate() for _ in range(2)]
        for i, k in enumerate(others):
            k.save(root / f"replica-{i + 2}.key")
        self.cluster = init_cluster(
            root,
            [self.a, self.b],
            [k.public.text for k in others],
            [self.a.pubkey, self.b.pubkey],
            timeout=30,
        )
        self.replicas: list[subprocess.Popen[bytes]] = []

    def start_replica(self, i: int) -> None:
        cmd = [PY, "-m", "dwcp.consensus.net", "replica", "--config", str(self.cluster), "--new"]
        cmd += ["--id", str(i), "--key", str(self.root / f"replica-{i}.key")]
        cmd += ["--wal", str(self.root / f"replica-{i}.wal")]
        log = open(self.root / f"replica-{i}.log", "ab")  # noqa: SIM115 - owned by the child
        self.replicas.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV))
        log.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        w.start_replica(2)
        w.start_replica(3)
        for n in (w.a, w.b, w.c):
            n.start()
        yield w
    finally:
        for n in (w.a, w.b, w.c):
            if n.proc is not None:
                n.stop()
        for p in w.replicas:
            p.terminate()
            p.wait(timeout=30)


def test_add_node_admits_and_remove_node_drops(world: World) -> None:
    a, b, c = world.a, world.b, world.c
    wait_until(lambda: heard_alive(a, "b") and heard_alive(b, "a"), "a and b alive", polls=400)
    assert "c" not in states(a) and "c" not in states(b)
    wait_until(lambda: members(a)["dropped"]["not_admitted"] > 0, "c's gossip dropped at a")
    assert members(c)["bytes_received"] == 0  # c is told nothing before it is admitted

    out = a.cli("cluster", "add-node", "c", c.pubkey, f"127.0.0.1:{world.ports['c']}", "--json")
    added = json.loads(out.stdout.strip().splitlines()[-1])
    assert added["name"] == "c" and added["version"] == 1
    wait_until(
        lambda: all(heard_alive(n, "c") for n in (a, b)) and heard_alive(c, "a"),
        "c alive at a and b after add-node",
        polls=400,
    )
    assert members(b)["admission"] == {"source": "registry", "version": 1}
    rows = json.loads(b.cli("members", "--json").stdout.strip().splitlines()[-1])
    assert sorted(r["name"] for r in rows) == ["a", "b", "c"]
    # a name or key that is already a member is refused before anything is proposed
    dup = a.cli("cluster", "add-node", "a", NodeKey.generate().public.text, "h:1", check=False)
    assert dup.returncode != 0 and "already a member" in dup.stderr
    dup = b.cli("cluster", "add-node", "d", c.pubkey, "127.0.0.1:9", check=False)
    assert dup.returncode != 0 and "already member c's" in dup.stderr

    out = b.cli("cluster", "remove-node", "c", "--json")  # from another member
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"name": "c", "version": 2}
    wait_until(
        lambda: "c" not in states(a) and "c" not in states(b), "c dropped at a and b", polls=400
    )
    time.sleep(2 * PERIOD)  # datagrams already in flight land
    got, dropped = members(c)["bytes_received"], members(a)["dropped"]["not_admitted"]
    time.sleep(6 * PERIOD)
    assert members(c)["bytes_received"] == got  # told nothing
    assert members(a)["dropped"]["not_admitted"] > dropped  # c still gossips; dropped
    assert heard_alive(a, "b") and heard_alive(b, "a")
    gone = a.cli("cluster", "remove-node", "c", check=False)
    assert gone.returncode != 0 and "not an admitted member" in gone.stderr
