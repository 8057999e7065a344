"""Eight real ``dwcp-node`` daemons on loopback gossiping (ASS): they find each other, a
killed node is dead everywhere within the suspicion bound and alive after its restart, and
a node that is not admitted gets nothing."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from node.cluster import NodeProc, free_udp_port, wait_until

from dwcp.gossip.auth import Signer
from dwcp.gossip.health import suspicion_min
from dwcp.gossip.messages import PING, Message, encode
from dwcp.identity import NodeKey
from dwcp.node import control
from dwcp.node.config import load_config

PERIOD = 0.5
N = 8


def write_admission(nodes: list[NodeProc], ports: dict[str, int]) -> None:
    members = "".join(
        f'\n[[members]]\nname = "{n.name}"\nkey = "{n.pubkey}"\n'
        f'address = "127.0.0.1:{ports[n.name]}"\n'
        for n in nodes
    )
    for n in nodes:
        text = f'listen = "127.0.0.1:{ports[n.name]}"\nperiod = {PERIOD}\n' + members
        (n.dir / "gossip.toml").write_text(text)


def members(n: NodeProc) -> dict[str, Any]:
    return dict(control.call(load_config(n.config).control_path, "members", timeout=10))


def states(n: NodeProc) -> dict[str, str]:
    return {r["name"]: r["state"] for r in members(n)["members"] if not r["self"]}


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    mport = free_udp_port(socket.SOCK_STREAM)
    nodes = [NodeProc(tmp_path, f"g{i}", metrics_port=mport if i == 0 else None) for i in range(N)]
    nodes[0].metrics_port = mport  # type: ignore[attr-defined]
    ports = {n.name: free_udp_port() for n in nodes}
    write_admission(nodes, ports)
    try:
        for n in nodes:
            n.start()
        yield nodes, ports
    finally:
        for n in nodes:
            if n.proc is not None:
                n.stop()


def test_eight_nodes_alive_dead_and_back(fleet: Any) -> None:
    nodes, _ = fleet
    everyone = {n.name for n in nodes}

    def all_alive(skip: str = "") -> bool:
        for n in nodes:
            if n.name == skip:
                continue
            st = states(n)
            rows = members(n)["members"]
            if set(st) != everyone - {n.name} or set(st.values()) != {"alive"}:
                return False
            if any(r["heard_s"] is None for r in rows if not r["self"] and r["name"] != skip):
                return False
        return True

    wait_until(all_alive, "every member heard from and alive at every node", polls=600)
    victim = nodes[3]
    victim.kill()
    bound = suspicion_min(4, N, PERIOD) * 6 + N * PERIOD + 5  # lifeguard max + a probe cycle
    wait_until(
        lambda: all(states(n)[victim.name] == "dead" for n in nodes if n is not victim),
        f"{victim.name} dead everywhere within {bound:.0f} s",
        polls=int(bound / 0.1),
        interval=0.1,
    )
    victim.start()
    wait_until(all_alive, f"{victim.name} alive again everywhere", polls=600)
    inc = {n.name: {r["name"]: r["incarnation"] for r in members(n)["members"]} for n in nodes}
    assert len({inc[n.name][victim.name] for n in nodes}) == 1  # one incarnation everywhere
    assert inc[victim.name][victim.name] >= 2  # persisted across the restart, then raised
    out = nodes[0].cli("members", "--json").stdout.strip().splitlines()[-1]
    rows = json.loads(out)
    assert rows[0]["name"] == nodes[0].name and len(rows) == N
    assert {r["state"] for r in rows} == {"alive"}
    port = nodes[0].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert f'dwcp_gossip_members{{state="alive"}} {float(N)}' in text
    assert 'dwcp_gossip_events_total{event="probes"}' in text


def test_an_image_appears_in_where_everywhere(fleet: Any) -> None:
    nodes, _ = fleet
    src = nodes[5]
    data = os.urandom(1 << 20)
    (src.images / "vm-where.img").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()

    def everywhere() -> bool:
        for n in nodes:
            got = json.loads(n.cli("where", "vm-where.img", "--json").stdout.splitlines()[-1])
            if [r["member"] for r in got] != [src.name] or got[0]["sha256"] != sha:
                return False
        return True

    wait_until(everywhere, "the image in 'where' at every node", polls=60, interval=0.5)
    rows = json.loads(nodes[0].cli("members", "--json").stdout.splitlines()[-1])
    assert next(r for r in rows if r["name"] == src.name)["images"] == ["vm-where.img"]
    by_sha = json.loads(nodes[1].cli("where", sha, "--json").stdout.splitlines()[-1])
    assert by_sha[0]["member"] == src.name


def test_not_admitted_gets_nothing(fleet: Any) -> None:
    nodes, ports = fleet
    target = nodes[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(2.0)
        ping = encode(Message(PING, 1, target.name, []))
        s.sendto(Signer(NodeKey.generate(), "mallory").seal(ping), ("127.0.0.1", ports["g0"]))
        # a stranger's key under a member's name: a forgery
        s.sendto(Signer(NodeKey.generate(), nodes[1].name).seal(ping), ("127.0.0.1", ports["g0"]))
        s.sendto(b"garbage", ("127.0.0.1", ports["g0"]))
        with pytest.raises(TimeoutError):
            s.recvfrom(2048)
    wait_until(
        lambda: (
            members(target)["dropped"]["not_admitted"] >= 1
            and members(target)["dropped"]["forged"] >= 1
            and members(target)["dropped"]["malformed"] >= 1
        ),
        "the stranger, the forgery and the garbage counted as dropped",
    )
