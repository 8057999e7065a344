"""The shared task discipline and length-prefixed framing."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dwcp import framing
from dwcp.errors import ProtocolError
from dwcp.tasks import TaskSet, cancel_and_wait, wait_unshielded


def test_cancel_and_wait_reraises_callers_cancellation() -> None:
    async def main() -> None:
        release = asyncio.Event()
        finished: list[str] = []

        async def stubborn() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                await release.wait()  # unwinding takes a while
                finished.append("child")

        child = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        caller = asyncio.create_task(cancel_and_wait(child))
        await asyncio.sleep(0)
        caller.cancel()  # the caller itself is cancelled while it waits
        await asyncio.sleep(0)
        assert not caller.done()  # still waiting for the child to unwind
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert finished == ["child"] and child.done()

    asyncio.run(main())


def test_wait_unshielded_outlasts_cancellation() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        waiter = asyncio.create_task(wait_unshielded(fut))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        assert not waiter.done()
        fut.set_result(1)
        with pytest.raises(asyncio.CancelledError):
            await waiter
        ok = await wait_unshielded(asyncio.ensure_future(asyncio.sleep(0, result=5)))
        assert ok == 5

    asyncio.run(main())


def test_taskset_closes_everything() -> None:
    async def main() -> None:
        ts = TaskSet("t")
        tasks = [ts.spawn(asyncio.sleep(3600)) for _ in range(5)]
        ts.spawn(asyncio.sleep(0))
        await asyncio.sleep(0.01)
        assert len(ts) == 5
        await ts.aclose()
        assert all(t.cancelled() for t in tasks) and len(ts) == 0
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            ts.spawn(coro)

    asyncio.run(main())


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 50))
def test_decoder_roundtrip_any_split(frames: list[bytes], step: int) -> None:
    wire = b"".join(framing.encode(f) for f in frames)
    dec = framing.Decoder(max_frame=300)
    out: list[bytes] = []
    for i in range(0, len(wire), step):
        out.extend(dec.feed(wire[i : i + step]))
    assert out == frames and dec.buffered == 0


def test_decoder_rejects_oversize_before_buffering() -> None:
    dec = framing.Decoder(max_frame=10)
    with pytest.raises(ProtocolError):
        list(dec.feed(framing.header(11) + b"x"))
    assert dec.buffered == 0


def test_read_frame() -> None:
    async def main() -> None:
        r = asyncio.StreamReader()
        r.feed_data(framing.encode(b"hello") + framing.header(99))
        assert await framing.read_frame(r, 10) == b"hello"
        with pytest.raises(ProtocolError):
            await framing.read_frame(r, 10)

    asyncio.run(main())
