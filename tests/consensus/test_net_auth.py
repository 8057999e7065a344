"""Issue 19 items 4 and 5: the replica TCP ports admit only keys the cluster file lists.

Both tests fail at 9038843: a fake ``"C" + <client key>`` hello stole the client's
replies (every later request timed out), and twelve connections holding 16 MiB - 1 of a
16 MiB frame each were buffered in full by the replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dwcp import framing
from dwcp.consensus.handshake import max_handshake_frame
from dwcp.consensus.net import ClientPool
from dwcp.consensus.registry import decode_result, encode_op
from dwcp.consensus.testing import LocalCluster
from dwcp.identity import NodeKey

# Upper bounds only, so a hung cluster fails instead of blocking CI; never a speed assertion.
HANG_GUARD = 30.0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _fake_hello(lc: LocalCluster, key: NodeKey) -> None:
    """What the issue's attacker did: claim the client's public key, hang up."""
    for host, port in lc.net.addresses:
        _, w = await asyncio.open_connection(host, port)
        w.write(framing.encode(b"C" + key.public.raw))
        await w.drain()
        w.close()


async def _forged_proof(lc: LocalCluster, key: NodeKey) -> None:
    """An attacker who knows the key but not its private half: a real HELLO, then a PROOF
    with a made-up signature. The replica hangs up."""
    for host, port in lc.net.addresses:
        r, w = await asyncio.open_connection(host, port)
        w.write(framing.encode(b"H1" + bytes(32)))
        await framing.read_frame(r, 4096)
        w.write(framing.encode(b"C\x00\x01" + key.public.raw + bytes(64)))
        await w.drain()
        assert await asyncio.wait_for(r.read(), HANG_GUARD) == b""
        w.close()


@pytest.mark.parametrize("attack", [_fake_hello, _forged_proof])
def test_a_spoofed_client_does_not_steal_replies(
    tmp_path: Path, attack: Callable[[LocalCluster, NodeKey], Awaitable[None]]
) -> None:
    with LocalCluster(tmp_path, clients=1, view_change_timeout=0.5, client_retry=0.25) as lc:
        lc.start_all()
        key = lc.client_keys()[0]

        async def scenario() -> None:
            pool = ClientPool(lc.net, [key])
            await pool.start(timeout=HANG_GUARD)
            try:
                first = await pool.request(encode_op("register", "vm1", "h0"), timeout=HANG_GUARD)
                assert decode_result(first.result).ok
                await attack(lc, key)
                done = await pool.request(encode_op("get", "vm1"), timeout=HANG_GUARD)
                assert decode_result(done.result).owner == "h0"
            finally:
                pool.close()

        asyncio.run(scenario())


def test_unauthenticated_connections_cannot_hold_memory(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, clients=1, view_change_timeout=0.5, client_retry=0.25) as lc:
        lc.start_all()
        host, port = lc.net.addresses[0]
        pid = lc.procs[0].pid
        big = 16 << 20

        async def scenario() -> int:
            pool = ClientPool(lc.net, lc.client_keys())
            await pool.start(timeout=HANG_GUARD)  # the replica is up and serving
            pool.close()
            before = _rss(pid)
            conns = []
            chunk = bytes(1 << 20)
            for _ in range(12):
                r, w = await asyncio.open_connection(host, port)
                conns.append((r, w))
                try:
                    w.write(framing.header(big))
                    for _ in range(big // len(chunk) - 1):
                        w.write(chunk)
                        await w.drain()
                    w.write(chunk[:-1])
                    await w.drain()
                except ConnectionError:
                    pass  # the replica hung up: what it should do
            await asyncio.sleep(0.5)  # let the replica read what it was sent
            grown = _rss(pid) - before
            for _, w in conns:
                w.close()
            return grown

        grown = asyncio.run(scenario())
    # 12 x 16 MiB were sent; an authenticated-only buffer holds none of it.
    assert grown < 48 << 20, f"replica RSS grew by {grown >> 20} MiB"
    assert max_handshake_frame(lc.net.cluster) < 1 << 16
