"""Byte relays between a local unix socket (QEMU's side) and a dwcp channel.

Each QEMU connection (the migration stream, the NBD client) gets its own
channel, so one stream's loss or backpressure never stalls another. Buffering
is bounded by the channel's flow control and asyncio's drain.

What enters a channel is zstd-1 compressed, one frame per read of up to CHUNK
bytes (``packed``): QEMU's single-channel precopy sends RAM uncompressed, and on
a WAN the bytes, not the CPU, bound the migration (issue 12's benchmark: 73 MB
of a 128 MiB guest's RAM, ~30 MB compressed). Frames are independent and carry
their size, so the receiver checks it before decompressing: memory stays bounded
whatever the peer sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import zstandard

from dwcp import framing
from dwcp.errors import ProtocolError

CHUNK = 256 << 10
LEVEL = 1
MAX_PACKED = CHUNK + CHUNK // 128 + 1024  # zstd's bound for an incompressible CHUNK
LINGER_SECONDS = 5.0  # after one direction ends, how long the other may still run


class _Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...
    async def readexactly(self, n: int) -> bytes: ...


class Counter:
    def __init__(self) -> None:
        self.up = 0  # source -> destination
        self.down = 0
        self.raw = [0]  # live: bytes read from the local end into packed channels (uncompressed)


async def _copy(
    reader: _Reader, writer: Any, count: list[int], raw: list[int] | None = None
) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            count[0] += len(data)
            writer.write(data)
            await writer.drain()
            if raw is not None:  # into a channel (QEMU compressed it): as in _pack
                raw[0] += len(data)
    finally:
        with contextlib.suppress(Exception):
            writer.write_eof()


async def _pack(
    reader: _Reader, writer: Any, count: list[int], raw: list[int] | None = None
) -> None:
    """Into a channel: each read compressed to one zstd frame (counted as sent). ``raw``
    counts the uncompressed bytes once the channel took them (after drain): the rate QEMU's
    stream crosses the link at, for ``converge``."""
    z = zstandard.ZstdCompressor(level=LEVEL)
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            frame = z.compress(data)
            count[0] += framing.HEADER_SIZE + len(frame)
            writer.write(framing.header(len(frame)))
            writer.write(frame)
            await writer.drain()
            if raw is not None:
                raw[0] += len(data)
    finally:
        with contextlib.suppress(Exception):
            writer.write_eof()


async def _unpack(reader: _Reader, writer: Any, count: list[int]) -> None:
    """Out of a channel: frames checked (size <= CHUNK) and decompressed."""
    z = zstandard.ZstdDecompressor()
    try:
        while True:
            try:
                frame = await framing.read_frame(reader, MAX_PACKED)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise ProtocolError("the relay stream ended inside a frame") from None
                break
            count[0] += framing.HEADER_SIZE + len(frame)
            try:
                size = zstandard.frame_content_size(frame)
                if not 0 < size <= CHUNK:
                    raise ProtocolError(f"a relay frame declares {size} bytes (at most {CHUNK})")
                data = z.decompress(frame, max_output_size=CHUNK)
            except zstandard.ZstdError as exc:
                raise ProtocolError(f"a relay frame does not decompress: {exc}") from None
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.write_eof()


async def pipe(
    a_r: _Reader, a_w: Any, b_r: _Reader, b_w: Any, counter: Counter, packed: str | None = None
) -> None:
    """Copy a->b and b->a until both end, or one ends and the other lingers too long.

    ``packed``: which end ("a" or "b") is the channel; what goes into it is compressed,
    what comes out of it decompressed. The counter counts the channel's bytes."""
    up, down = [0], [0]
    if packed == "b":
        ab, ba = _pack(a_r, b_w, up, counter.raw), _unpack(b_r, a_w, down)
    elif packed == "a":
        ab, ba = _unpack(a_r, b_w, up), _pack(b_r, a_w, down)
    else:
        ab, ba = _copy(a_r, b_w, up, counter.raw), _copy(b_r, a_w, down)
    t1 = asyncio.create_task(ab)
    t2 = asyncio.create_task(ba)
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
