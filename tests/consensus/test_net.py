"""Four real replica processes on loopback commit requests, and survive the primary's crash."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from dwcp.consensus.conn import FrameProtocol
from dwcp.consensus.net import ClientPool, NetConfig
from dwcp.consensus.registry import decode_result, encode_op
from dwcp.consensus.testing import LocalCluster
from dwcp.framing import encode as frame

# Upper bounds only, so a hung cluster fails instead of blocking CI; never a speed assertion.
HANG_GUARD = 60.0


async def _op(pool: ClientPool, *items: str | int) -> tuple[bool, str, int]:
    done = await asyncio.wait_for(pool.request(encode_op(*items)), HANG_GUARD)
    r = decode_result(done.result)
    return r.ok, r.owner, r.epoch


async def _junk(lc: LocalCluster) -> None:
    """Hostile connections: bogus hellos, random frames, a huge length prefix."""
    rng = random.Random(5)
    for host, port in lc.net.addresses:
        for first in (b"C" + rng.randbytes(64), b"Rxx", b"", b"R\x00\x01"):
            _, w = await asyncio.open_connection(host, port)
            try:
                w.write(frame(first))
                for _ in range(20):
                    w.write(frame(rng.randbytes(rng.randrange(0, 300))))
                w.write(b"\xff\xff\xff\xf0" + rng.randbytes(100))
                await w.drain()
            except ConnectionError:
                pass  # the replica hung up on us: that is an acceptable answer
            finally:
                w.close()


def test_four_processes_commit_then_a_new_view_commits(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, clients=1, view_change_timeout=0.5, client_retry=0.25) as lc:
        lc.start_all()

        async def scenario() -> None:
            pool = ClientPool(lc.net, lc.client_keys())
            await pool.start(timeout=HANG_GUARD)
            await _junk(lc)
            try:
                assert await _op(pool, "register", "vm1", "h0") == (True, "h0", 1)
                assert await _op(pool, "migrate", "vm1", "h0", "h1", 1) == (True, "h1", 2)
                assert await _op(pool, "migrate", "vm1", "h0", "h2", 1) == (False, "h1", 2)
                lc.kill(0)  # the primary of view 0
                assert await _op(pool, "migrate", "vm1", "h1", "h2", 2) == (True, "h2", 3)
                assert await _op(pool, "get", "vm1") == (True, "h2", 3)
                # Replica 0 restarts from its WAL; then the view-1 primary dies: the next
                # view needs replica 0's votes, so it must have rejoined.
                lc.start(0)
                for k in range(3):
                    assert (await _op(pool, "register", f"vm-x{k}", "h3"))[0]
                lc.kill(1)
                assert await _op(pool, "migrate", "vm1", "h2", "h3", 3) == (True, "h3", 4)
            finally:
                pool.close()

        asyncio.run(scenario())
        logs = [lc.log(i) for i in (2, 3)]
    assert all("view 1" in text for text in logs), logs
    assert any("view 2" in text or "view 3" in text for text in logs), logs


def test_net_config_roundtrip(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, clients=2) as lc:
        again = NetConfig.load(tmp_path / "cluster.json")
        assert again == lc.net


def test_frame_protocol_splits_and_refuses_oversized_frames() -> None:
    async def scenario() -> None:
        got: list[bytes] = []
        hellos: list[bytes] = []

        def handshake(p: FrameProtocol, d: bytes) -> bool:
            hellos.append(d)
            return True

        proto = FrameProtocol(16, lambda p, d: got.append(d), handshake=handshake)

        class T(asyncio.Transport):
            closed = False

            def close(self) -> None:
                self.closed = True

            def is_closing(self) -> bool:
                return self.closed

        t = T()
        proto.connection_made(t)
        stream = frame(b"hi") + frame(b"a") + frame(b"bc") + frame(b"")
        for i in range(len(stream)):  # byte by byte: every split point
            proto.data_received(stream[i : i + 1])
        assert hellos == [b"hi"] and got == [b"a", b"bc", b""]
        proto.data_received(frame(b"x" * 17))
        assert t.closed

    asyncio.run(scenario())


@pytest.mark.parametrize("junk", [b"\x00\x00\x00\x05abc", b"\xff\xff\xff\xff"])
def test_partial_or_huge_length_does_not_deliver(junk: bytes) -> None:
    async def scenario() -> None:
        got: list[bytes] = []
        proto = FrameProtocol(1024, lambda p, d: got.append(d))

        class T(asyncio.Transport):
            def close(self) -> None:
                pass

        proto.connection_made(T())
        proto.data_received(junk)
        assert got == []
        assert proto.buffered <= len(junk)

    asyncio.run(scenario())


def test_fsync_in_a_worker_thread_commits(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, clients=1, view_change_timeout=0.5, client_retry=0.25) as lc:
        lc.replica_args.append("--sync-thread")
        lc.start_all()

        async def scenario() -> None:
            pool = ClientPool(lc.net, lc.client_keys())
            await pool.start(timeout=HANG_GUARD)
            try:
                for k in range(5):
                    assert (await _op(pool, "register", f"vm{k}", "h1"))[0]
                assert await _op(pool, "migrate", "vm0", "h1", "h2", 1) == (True, "h2", 2)
            finally:
                pool.close()

        asyncio.run(scenario())
    assert all((tmp_path / f"replica-{i}.wal").stat().st_size > 100 for i in range(4))


def test_pool_verifies_a_batched_reply_once_for_all_its_clients() -> None:
    """A REPLIES naming several waiting clients costs one verification, forged or not."""
    from dwcp.consensus import ClusterConfig
    from dwcp.consensus.messages import Codec, Replies
    from dwcp.identity import NodeKey

    rkeys = [NodeKey(bytes([3, i]) * 16) for i in range(4)]
    ckeys = [NodeKey(bytes([4, i]) * 16) for i in range(3)]
    cfg = ClusterConfig(b"pool", tuple(k.public for k in rkeys), tuple(k.public for k in ckeys))
    net = NetConfig(cfg, tuple(("127.0.0.1", 1) for _ in range(4)))

    async def main() -> None:
        pool = ClientPool(net, ckeys)
        stamps = []
        for c in pool.clients:
            c.request(encode_op("get", "vm"), 0.0)
            assert c._ts is not None
            stamps.append(c._ts)
        entries = tuple((c.index, ts, b"r") for c, ts in zip(pool.clients, stamps, strict=True))
        signer = Codec(cfg)
        forged = signer.encode(Replies(0, entries), 2, rkeys[1])  # replica 1 posing as 2
        pool.on_frame(None, forged)  # type: ignore[arg-type]
        assert pool.codec.verifications == 1 and pool.bad_signatures == 1
        assert all(c.busy for c in pool.clients)
        for i in (1, 3):
            pool.on_frame(None, signer.encode(Replies(0, entries), i, rkeys[i]))  # type: ignore[arg-type]
        assert pool.codec.verifications == 3
        assert not any(c.busy for c in pool.clients)
        pool.close()

    asyncio.run(main())
