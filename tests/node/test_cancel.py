"""Cancelling a migration, or stopping a node mid-flight, leaves nothing running: no
task, no thread, no file descriptor (issue 11: one task discipline)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest

from dwcp import migrate
from dwcp.identity import NodeKey
from dwcp.node.config import load_config
from dwcp.node.daemon import Node
from dwcp.tasks import cancel_and_wait
from node.cluster import NodeProc, make_image, sha256_file
from node.test_glue import Dest, pair

MiB = 1 << 20


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


async def _until(predicate: object, what: str, polls: int = 1200) -> None:
    for _ in range(polls):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("bulk", [False, True])
def test_cancelling_both_sides_mid_stream_leaves_nothing_running(
    tmp_path: Path, bulk: bool
) -> None:
    src = tmp_path / "v.img"
    src.write_bytes(os.urandom(8 * MiB))
    fds, threads = _fds(), _threads()

    async def main() -> None:
        key = NodeKey.generate()
        dest = Dest(tmp_path / "dest")
        await dest.index.open(dest.store.images_dir)
        s, r = pair(bulk)
        sent: list[int] = []
        send = asyncio.create_task(
            migrate.send_image(
                s,
                key,
                src,
                name="v.img",
                peer="b",
                level=1,
                bwlimit=2 * MiB,
                on_progress=lambda p: sent.append(p.bytes_sent),
            )
        )
        recv = asyncio.create_task(migrate.receive_image(r, key.public, dest.hooks()))
        await _until(lambda: sent and sent[-1] > 2 * MiB, "data to flow")
        await cancel_and_wait(send, recv)
        assert send.cancelled() and recv.cancelled()
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        # what was received is kept: the same migration resumes
        assert len(dest.store.partial_transfers()) == 1
        s, r = pair(bulk)
        res, name = await asyncio.gather(
            migrate.send_image(s, key, src, name="v.img", peer="b", level=1),
            migrate.receive_image(r, key.public, dest.hooks()),
        )
        assert name == "v.img" and res.resumed
        assert hashlib.sha256((dest.store.images_dir / "v.img").read_bytes()).hexdigest() == (
            hashlib.sha256(src.read_bytes()).hexdigest()
        )
        await dest.index.close()

    asyncio.run(main())
    assert _threads() == threads
    assert _fds() == fds


def test_stopping_a_node_mid_flight_leaves_nothing_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The destination runs in this process; a source node sends to it; the destination
    is told to stop (SIGTERM's path) while the data flows."""
    a = NodeProc(tmp_path, "a")
    b = NodeProc(tmp_path, "b", drain_seconds=0)
    a.trust(b)
    b.trust(a)
    a.start()
    img = tmp_path / "big.img"
    make_image(img, 16, seed=3)
    fds, threads = _fds(), _threads()
    node = Node(load_config(b.config))

    procs = []

    async def drive() -> None:
        await _until(lambda: node.ctx is not None and node.control._made is not None, "start")
        procs.append(a.popen_cli("migrate", str(img), "--to", "b", "--bwlimit", "2M"))
        assert node.ctx is not None
        stats = node.ctx.stats
        await _until(lambda: stats.bytes_received > 2 * MiB, "data to flow")
        node.handle_exit()  # what SIGTERM does

    async def main() -> None:
        driver = asyncio.create_task(drive())
        await node.serve()  # as dwcp-node runs it: the only task left at the end
        assert driver.done()
        driver.result()

    try:
        with caplog.at_level(logging.WARNING, logger="dwcp"):
            asyncio.run(main())
    finally:
        for proc in procs:
            _out, err = proc.communicate(timeout=120)
    assert procs and procs[0].returncode != 0 and "error" in err
    a.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert _threads() == threads
    assert _fds() == fds
    assert len(list(b.partial.iterdir())) == 1 and not (b.images / "big.img").exists()
    b.start()  # the same migration resumes on the restarted node
    try:
        a.start()
        res = a.migrate_json(str(img), "--to", "b")
        assert res["resumed"] and sha256_file(b.images / "big.img") == sha256_file(img)
    finally:
        a.stop()
        b.stop()
