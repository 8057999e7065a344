"""PeerSessions: channels dispatched by name, sessions kept per peer and reused (QUIC, loopback)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dwcp.errors import RemoteError
from dwcp.identity import NodeKey, PublicKey
from dwcp.migrate import QuicChannel
from dwcp.node.config import Address, Peer
from dwcp.node.sessions import PeerSessions
from dwcp.transport import Channel, Session

NAME = "test-echo/1"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _echo_pair() -> tuple[PeerSessions, PeerSessions, Peer, list[int]]:
    ka, kb = NodeKey.generate(), NodeKey.generate()
    port = _free_udp_port()
    sessions: list[int] = []

    async def echo(peer: PublicKey, session: Session, chan: Channel) -> None:
        sessions.append(id(session))
        qc = QuicChannel(session, chan.reader, chan.writer)
        await qc.send(await qc.recv())

    b = PeerSessions(kb, Address("127.0.0.1", port), lambda: [ka.public])
    b.add_channel_handler(NAME, echo)
    await b.start()
    a = PeerSessions(ka, Address("127.0.0.1", 0), lambda: [])
    await a.start()
    return a, b, Peer("b", Address("127.0.0.1", port), kb.public), sessions


async def _round_trip(a: PeerSessions, peer: Peer, data: bytes, name: str = NAME) -> Session:
    session = await a.checkout(peer)
    chan = await session.open_channel(name)
    qc = QuicChannel(session, chan.reader, chan.writer)
    await qc.send(data)
    assert await asyncio.wait_for(qc.recv(), 30) == data
    qc.end()
    return session


def test_a_clean_session_is_reused_and_a_failed_one_is_not() -> None:
    async def main() -> None:
        a, b, peer, sessions = await _echo_pair()
        try:
            first = await _round_trip(a, peer, b"one")
            a.checkin(first, reuse=True)
            second = await _round_trip(a, peer, b"two")
            assert second is first  # no new handshake
            a.checkin(second, reuse=False)  # e.g. the migration failed
            async with asyncio.timeout(20):
                while not second.closed:
                    await asyncio.sleep(0.02)
            third = await _round_trip(a, peer, b"three")
            assert third is not first
            a.checkin(third, reuse=True)
            assert len(sessions) == 3 and sessions[0] == sessions[1] != sessions[2]
        finally:
            await a.close()
            await b.close()
        assert third.closed  # close() ends the kept sessions too

    asyncio.run(main())


def test_an_idle_session_is_closed_after_the_keep_time() -> None:
    async def main() -> None:
        a, b, peer, _ = await _echo_pair()
        a.keep_seconds = 0.05
        try:
            first = await _round_trip(a, peer, b"x")
            a.checkin(first, reuse=True)
            async with asyncio.timeout(20):
                while not first.closed:
                    await asyncio.sleep(0.02)
            again = await _round_trip(a, peer, b"y")  # a new session
            assert again is not first
            a.checkin(again, reuse=True)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_requests_by_kind_and_unknown_channels() -> None:
    async def main() -> None:
        a, b, peer, _ = await _echo_pair()

        async def upper(peer_key: PublicKey, body: bytes) -> bytes:
            return body.upper()

        b.add_request_handler("upper", upper)
        with pytest.raises(ValueError):
            b.add_request_handler("upper", upper)
        try:
            session = await a.checkout(peer)
            assert await session.request(b"ping\n", timeout=30) == b"pong"
            assert await session.request(b"upper\nabc", timeout=30) == b"ABC"
            with pytest.raises(RemoteError, match="no 'nope' requests"):
                await session.request(b"nope\n", timeout=30)
            chan = await session.open_channel("no-such-channel")
            assert await asyncio.wait_for(chan.reader.read(), 30) == b""  # closed by b
            # the session still serves the channels it knows
            qc_chan = await session.open_channel(NAME)
            qc = QuicChannel(session, qc_chan.reader, qc_chan.writer)
            await qc.send(b"still")
            assert await asyncio.wait_for(qc.recv(), 30) == b"still"
            a.checkin(session, reuse=False)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
