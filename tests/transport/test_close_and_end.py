"""The end of a bulk transfer and of a session: nothing written is lost, nothing waits forever."""

from __future__ import annotations

import asyncio
import os

import pytest

from dwcp.transport import Session

from .helpers import run
from .test_session import MiB, pair


@pytest.mark.parametrize("read_again", [True, False], ids=["reads-again", "never-reads-again"])
def test_finish_returns_when_the_end_arrives_after_the_last_chunk_was_read(
    read_again: bool,
) -> None:
    payload = os.urandom(1000)  # far below the periodic ack interval: only the final ack counts
    got = bytearray()

    async def main() -> None:
        all_read = asyncio.Event()
        tail: list[bytes] = []
        tail_read = asyncio.Event()

        async def handler(session: Session) -> None:
            recv = await session.accept_bulk()
            while len(got) < len(payload):
                got.extend(await recv.read())
            all_read.set()  # only now does the sender mark the end
            if read_again:
                tail.append(await recv.read())
                tail_read.set()
            else:
                await session.wait_closed()

        async with pair(handler) as (session, _server):
            sender = session.open_bulk()
            await sender.write(payload)
            await all_read.wait()
            assert await sender.finish() == len(payload)
            assert sender.acked == len(payload)
            if read_again:
                await tail_read.wait()
                assert tail == [b""]

    run(main(), timeout=30)
    assert bytes(got) == payload


def test_close_delivers_channel_data_written_just_before() -> None:
    payload = os.urandom(MiB)  # many congestion windows: most of it is unsent at close()

    async def main() -> None:
        received: asyncio.Future[tuple[bytes, bool]] = asyncio.get_running_loop().create_future()

        async def handler(session: Session) -> None:
            parts: list[bytes] = []
            saw_eof = False
            try:
                chan = await session.accept_channel()
                while data := await chan.reader.read(65536):
                    parts.append(data)
                saw_eof = True
            finally:  # also when the session's end cancels this handler
                received.set_result((b"".join(parts), saw_eof))

        async with pair(handler) as (session, _server):
            chan = await session.open_channel("last words")
            chan.writer.write(payload)
            chan.writer.write_eof()
            await session.close("done", linger=60)  # the linger only guards against a hang
            assert session.closed
            data, saw_eof = await received
            assert saw_eof
            assert data == payload

    run(main())


def test_receiver_closing_right_after_the_last_read_still_acks_the_sender() -> None:
    payload = os.urandom(3 * MiB)
    got: list[bytes] = []

    async def handler(session: Session) -> None:
        recv = await session.accept_bulk()
        got.append(b"".join([chunk async for chunk in recv]))
        await session.close("got it all", linger=60)  # the final ack is still queued here

    async def main() -> None:
        async with pair(handler) as (session, _server):
            assert await session.send([payload]) == len(payload)
            await session.wait_closed()

    run(main())
    assert got == [payload]


def test_close_gives_up_after_the_linger_when_the_peer_stops_reading() -> None:
    async def main() -> None:
        stalled = asyncio.Event()

        async def handler(session: Session) -> None:
            await session.accept_channel()  # never read: the channel's credit runs out
            stalled.set()
            await session.wait_closed()

        async with pair(handler) as (session, _server):
            chan = await session.open_channel("stuck")
            chan.writer.write(os.urandom(3 * session.config.stream_window))
            await stalled.wait()
            await session.close("giving up", linger=0.2)
            assert session.closed
        async with pair(handler) as (session, _server):
            chan = await session.open_channel("stuck")
            chan.writer.write(os.urandom(3 * session.config.stream_window))
            await session.close("at once", linger=0)
            assert session.closed

    run(main())
