"""NodeLink keeps a session per peer after a clean migration and reuses it (QUIC, loopback)."""

from __future__ import annotations

import asyncio
import socket

from dwcp.identity import NodeKey, PublicKey
from dwcp.node.config import Address, Peer
from dwcp.node.link import NodeLink, QuicChannel


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _echo_pair() -> tuple[NodeLink, NodeLink, Peer, list[int]]:
    ka, kb = NodeKey.generate(), NodeKey.generate()
    port = _free_udp_port()
    sessions: list[int] = []

    async def echo(peer: PublicKey, chan: QuicChannel) -> None:
        sessions.append(id(chan.session))
        await chan.send(await chan.recv())

    b = NodeLink(kb, Address("127.0.0.1", port))
    await b.start([ka.public], echo)
    a = NodeLink(ka, Address("127.0.0.1", 0))
    return a, b, Peer("b", Address("127.0.0.1", port), kb.public), sessions


async def _round_trip(a: NodeLink, peer: Peer, data: bytes) -> QuicChannel:
    chan = await a.open(peer)
    await chan.send(data)
    assert await asyncio.wait_for(chan.recv(), 30) == data
    return chan


def test_a_clean_session_is_reused_and_a_failed_one_is_not() -> None:
    async def main() -> None:
        a, b, peer, sessions = await _echo_pair()
        try:
            first = await _round_trip(a, peer, b"one")
            await a.release(first, reuse=True)
            second = await _round_trip(a, peer, b"two")
            assert second.session is first.session  # no new handshake
            await a.release(second, reuse=False)  # e.g. the migration failed
            assert second.session.closed
            third = await _round_trip(a, peer, b"three")
            assert third.session is not first.session
            await a.release(third, reuse=True)
            assert len(sessions) == 3 and sessions[0] == sessions[1] != sessions[2]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_an_idle_session_is_closed_after_the_keep_time() -> None:
    async def main() -> None:
        a, b, peer, _ = await _echo_pair()
        a.keep_seconds = 0.05
        try:
            chan = await _round_trip(a, peer, b"x")
            await a.release(chan, reuse=True)
            async with asyncio.timeout(20):
                while not chan.session.closed:
                    await asyncio.sleep(0.02)
            again = await _round_trip(a, peer, b"y")  # a new session
            assert again.session is not chan.session
            await a.release(again, reuse=True)
        finally:
            await a.close()
            await b.close()
        assert again.session.closed  # close() ends the kept sessions too

    asyncio.run(main())
