"""Migrations commit VM ownership through PBFT: real daemons, real replica processes.

Nodes a and b host replicas 0 and 1 of a 4-replica cluster; replicas 2 and 3 run
as plain ``python -m dwcp.consensus.net replica`` processes. A third client key
(``mallory``, a member that is not a node here) plays a node that owns a VM.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dwcp.consensus.net import ClientPool, NetConfig
from dwcp.consensus.registry import decode_result, encode_op
from dwcp.identity import NodeKey, PublicKey
from node.cluster import ENV, PY, NodeProc, dwcp, init_cluster, make_image, sha256_file

MiB = 1 << 20


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.a, self.b = NodeProc(root, "a"), NodeProc(root, "b")
        self.a.trust(self.b)
        self.b.trust(self.a)
        self.others = [NodeKey.generate() for _ in range(2)]
        self.mallory = NodeKey.generate()
        for i, k in enumerate(self.others):
            k.save(root / f"replica-{i + 2}.key")
        self.cluster = init_cluster(
            root,
            [self.a, self.b],
            [k.public.text for k in self.others],
            [self.a.pubkey, self.b.pubkey, self.mallory.public.text],
            timeout=60,
        )
        self.replicas: dict[int, subprocess.Popen[bytes]] = {}

    def start_replica(self, i: int) -> None:
        wal = self.root / f"replica-{i}.wal"
        cmd = [PY, "-m", "dwcp.consensus.net", "replica", "--config", str(self.cluster)]
        cmd += ["--id", str(i), "--key", str(self.root / f"replica-{i}.key"), "--wal", str(wal)]
        if not wal.exists():
            cmd.append("--new")
        log = open(self.root / f"replica-{i}.log", "ab")  # noqa: SIM115 - owned by the child
        self.replicas[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        log.close()

    def kill_replica(self, i: int) -> None:
        p = self.replicas.pop(i)
        p.kill()
        p.wait()

    def as_mallory(self, *op: str | int) -> Any:
        async def go() -> Any:
            pool = ClientPool(NetConfig.load(self.cluster), [self.mallory])
            await pool.start()
            try:
                done = await pool.request(encode_op(*op), timeout=60)
            finally:
                pool.close()
            return decode_result(done.result)

        return asyncio.run(go())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("owned"))
    try:
        w.start_replica(2)
        w.start_replica(3)
        w.a.start()
        w.b.start()
        yield w
    finally:
        for n in (w.a, w.b):
            if n.proc is not None:
                n.stop()
        for p in w.replicas.values():
            p.terminate()
            p.wait(timeout=30)


def _node_id(node: NodeProc) -> str:
    return PublicKey.parse(node.pubkey).node_id


def test_a_migration_hands_ownership_to_the_destination(world: World) -> None:
    a, b = world.a, world.b
    img = world.root / "vm1.img"
    make_image(img, 2, seed=11)
    out = a.migrate_json(str(img), "--to", "b")
    assert out["owner"] == _node_id(b) and out["epoch"] == 2  # registered at 1, moved to 2
    assert sha256_file(b.images / "vm1.img") == out["sha256"]
    for node in (a, b):
        got = node.cli("owner", "vm1.img")
        assert "owned by b" in got.stdout and "epoch 2" in got.stdout
    # a no longer owns it: it cannot push an image under that name, not even to the owner
    again = a.cli("migrate", str(img), "--to", "b", check=False)
    assert again.returncode == 1 and "already owned by the destination" in again.stderr
    # b moves it back, raising the epoch (the fencing token) by one
    back = b.migrate_json("vm1.img", "--to", "a")
    assert back["owner"] == _node_id(a) and back["epoch"] == 3
    status = a.status()["consensus"]
    assert status["replica"] == 0 and status["executed"] > 0 and not status["recovering"]
    assert "ownership cluster: 4 replicas (f = 1)" in a.cli("status").stdout


def test_a_vm_owned_by_another_node_is_refused_before_sending(world: World) -> None:
    a, b = world.a, world.b
    mid = world.mallory.public.node_id
    assert world.as_mallory("register", "vm2.img", mid).ok
    # mallory is a member, but cannot act for a: the registry checks the signer
    stolen = world.as_mallory("migrate", "vm1.img", _node_id(a), mid, 3)
    assert not stolen.ok and stolen.reason == "forbidden"
    img = world.root / "vm2.img"
    make_image(img, 1, seed=12)
    r = a.cli("migrate", str(img), "--to", "b", check=False)
    assert r.returncode == 1 and "owned by node " + mid in r.stderr
    assert not (b.images / "vm2.img").exists()


def test_commits_with_one_replica_down(world: World) -> None:
    world.kill_replica(3)
    try:
        img = world.root / "vm3.img"
        make_image(img, 1, seed=13)
        out = world.a.migrate_json(str(img), "--to", "b")
        assert out["owner"] == _node_id(world.b) and out["epoch"] == 2
    finally:
        world.start_replica(3)


def test_a_replica_that_lost_its_log_rejoins_as_recovering(world: World) -> None:
    b = world.b
    again = b.cli("cluster", "join", check=False)
    assert again.returncode == 2 and "joined already" in again.stderr
    b.stop()
    (b.dir / "data" / "consensus" / "replica-1.wal").unlink()
    b.start()
    assert b.status()["consensus"]["recovering"] is True
    # the cluster still commits (three voting replicas), and b still proposes as a client
    img = world.root / "vm4.img"
    make_image(img, 1, seed=14)
    out = world.a.migrate_json(str(img), "--to", "b")
    assert out["owner"] == _node_id(b)
    back = b.migrate_json("vm4.img", "--to", "a")
    assert back["owner"] == _node_id(world.a) and back["epoch"] == 3


def test_a_destination_refuses_images_over_vms_it_does_not_let_go(world: World) -> None:
    """Defence in depth: a sender without [consensus] skips the claim, the destination
    still checks (a owns vm1.img after the first test, mallory owns vm2.img)."""
    a = world.a
    c = NodeProc(world.root, "c")
    c.trust(a)
    a.trust(c)
    c.start()
    try:
        img = world.root / "vm-c.img"
        make_image(img, 1, seed=15)
        over = c.cli("migrate", str(img), "--to", "a", "--name", "vm1.img", check=False)
        assert over.returncode == 1 and "the destination owns VM vm1.img" in over.stderr
        third = c.cli("migrate", str(img), "--to", "a", "--name", "vm2.img", check=False)
        assert third.returncode == 1 and "not by the sending node" in third.stderr
        assert c.migrate_json(str(img), "--to", "a", "--name", "fresh.img")["owner"] is None
        assert sha256_file(a.images / "vm1.img") != sha256_file(img)
    finally:
        c.stop()


def test_cluster_init_checks_its_input(tmp_path: Path) -> None:
    keys = [NodeKey.generate().public.text for _ in range(3)]
    r = dwcp(
        "cluster",
        "init",
        str(tmp_path / "c.json"),
        *(f"--replica={k}@127.0.0.1:{7000 + i}" for i, k in enumerate(keys)),
        check=False,
    )
    assert r.returncode == 2 and "3f+1" in r.stderr
