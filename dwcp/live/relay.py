"""Byte relays between a local unix socket (QEMU's side) and a dwcp channel.

Each QEMU connection (the migration stream, the NBD client) gets its own
channel, so one stream's loss or backpressure never stalls another. Buffering
is bounded by the channel's flow control and asyncio's drain.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

CHUNK = 256 << 10
LINGER_SECONDS = 5.0  # after one direction ends, how long the other may still run


class _Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class Counter:
    def __init__(self) -> None:
        self.up = 0  # source -> destination
        self.down = 0


async def _copy(reader: _Reader, writer: Any, count: list[int]) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            count[0] += len(data)
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.write_eof()


async def pipe(a_r: _Reader, a_w: Any, b_r: _Reader, b_w: Any, counter: Counter) -> None:
    """Copy a->b and b->a until both end, or one ends and the other lingers too long."""
    up, down = [0], [0]
    t1 = asyncio.create_task(_copy(a_r, b_w, up))
    t2 = asyncio.create_task(_copy(b_r, a_w, down))
    try:
        _, pending = await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.wait(pending, timeout=LINGER_SECONDS)
    finally:
        for t in (t1, t2):
            if not t.done():
                t.cancel()
        await asyncio.gather(t1, t2, return_exceptions=True)
        counter.up += up[0]
        counter.down += down[0]
        for w in (a_w, b_w):
            with contextlib.suppress(Exception):
                w.close()
