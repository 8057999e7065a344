"""Channels behave like asyncio streams; cancelled waits leave the session usable (real QUIC)."""

from __future__ import annotations

import asyncio
import os

import pytest

from dwcp.errors import UsageError
from dwcp.transport import Session, TransportConfig

from .helpers import run
from .test_session import MiB, pair

SMALL = TransportConfig(idle_timeout=10.0, bandwidth_bps=10e6)  # a 1 MiB stream window


def test_channel_reader_and_writer_offer_the_asyncio_stream_calls() -> None:
    async def handler(session: Session) -> None:
        chan = await session.accept_channel()
        w = chan.writer
        assert w.get_extra_info("peer_key") == session.peer
        assert w.get_extra_info("channel") == "lines"
        assert w.get_extra_info("nothing", 7) == 7
        async for line in chan.reader:  # by line, like StreamReader
            w.write(line.upper())
            await w.drain()
        w.writelines([b"bye", b"\n", b"tail without newline"])
        assert w.can_write_eof()
        w.close()
        assert w.is_closing()
        await w.wait_closed()

    async def main() -> None:
        async with pair(handler) as (session, _server):
            chan = await session.open_channel("lines")
            chan.writer.write(b"one\ntw")
            chan.writer.write(b"o\nthree\n")
            chan.writer.write_eof()
            with pytest.raises(UsageError, match="closed for writing"):
                chan.writer.write(b"more")
            r = chan.reader
            assert await r.readline() == b"ONE\n"
            assert await r.readuntil(b"O\n") == b"TWO\n"
            assert await r.readexactly(6) == b"THREE\n"
            assert await r.readline() == b"bye\n"
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await r.readexactly(100)
            assert info.value.partial == b"tail without newline"
            assert await r.readline() == b""
            assert r.at_eof()

    run(main())


def test_a_message_larger_than_the_stream_window_arrives_in_one_readexactly() -> None:
    payload = os.urandom(3 * MiB + 17)  # three windows: credit must flow during the read

    async def handler(session: Session) -> None:
        chan = await session.accept_channel()
        chan.writer.write(payload)
        await chan.writer.drain()
        chan.writer.write_eof()
        await session.wait_closed()

    async def main() -> None:
        async with pair(handler, config=SMALL) as (session, _server):
            assert session.config.stream_window == MiB
            chan = await session.open_channel("big")
            got = await asyncio.wait_for(chan.reader.readexactly(len(payload)), 60)
            assert got == payload
            assert await chan.reader.read() == b""

    run(main())


def test_read_with_no_size_reads_to_the_end_and_readline_refuses_a_line_over_the_window() -> None:
    async def handler(session: Session) -> None:
        chan = await session.accept_channel()
        chan.writer.write(b"a" * (2 * MiB))  # no newline, longer than the 1 MiB window
        chan.writer.write_eof()
        other = await session.accept_channel()
        other.writer.write(b"x" * 300_000 + b"\n" + b"y" * 1000)
        other.writer.write_eof()
        await session.wait_closed()

    async def main() -> None:
        async with pair(handler, config=SMALL) as (session, _server):
            chan = await session.open_channel("long line")
            with pytest.raises(ValueError, match="longer than"):
                await asyncio.wait_for(chan.reader.readline(), 60)
            other = await session.open_channel("read all")
            assert await asyncio.wait_for(other.reader.read(), 60) == (
                b"x" * 300_000 + b"\n" + b"y" * 1000
            )

    run(main())


def test_cancelled_reads_accepts_and_requests_leave_the_session_usable() -> None:
    async def on_request(session: Session, body: bytes) -> bytes:
        if body == b"slow":
            await asyncio.sleep(0.5)
        return body

    async def main() -> None:
        go = asyncio.Event()

        async def handler(session: Session) -> None:
            chan = await session.accept_channel()
            await go.wait()
            chan.writer.write(b"0123456789")
            await chan.writer.drain()
            await session.send([b"bulk data"])
            await session.wait_closed()

        async with pair(handler, on_request=on_request) as (session, _server):
            # A request that times out: its late answer must not break the session.
            with pytest.raises(TimeoutError):
                await session.request(b"slow", timeout=0.05)
            # Waiting for a channel the peer has not opened, then giving up.
            accept = asyncio.ensure_future(session.accept_channel())
            await asyncio.sleep(0)
            accept.cancel()
            with pytest.raises(asyncio.CancelledError):
                await accept
            chan = await session.open_channel("cancel me")
            read = asyncio.ensure_future(chan.reader.readexactly(4))
            bulk = asyncio.ensure_future(session.accept_bulk())
            await asyncio.sleep(0.05)
            read.cancel()
            bulk.cancel()
            for task in (read, bulk):
                with pytest.raises(asyncio.CancelledError):
                    await task
            go.set()
            assert await session.request(b"still here", timeout=30) == b"still here"
            assert await chan.reader.readexactly(10) == b"0123456789"  # nothing was lost
            receiver = await session.accept_bulk()
            first = asyncio.ensure_future(receiver.read())
            assert b"".join([await first, *[c async for c in receiver]]) == b"bulk data"
            assert not session.closed

    run(main())


def test_async_with_closes_and_waits_for_the_session_and_the_server() -> None:
    async def main() -> None:
        handler_ended = asyncio.Event()

        async def handler(session: Session) -> None:
            try:
                await session.wait_closed()
                await asyncio.sleep(3600)  # still running when the server closes
            finally:
                handler_ended.set()

        async with pair(handler) as (session, server):
            async with session as entered:
                assert entered is session
            assert session.closed
        assert handler_ended.is_set()  # the server waited for its handler task
        assert server.sessions == {}

    run(main())
