"""One length-prefixed framing for every dwcp byte stream that carries messages.

Migration control channels (over QUIC streams) and the consensus network
binding (over TCP) both cut a byte stream into messages the same way: a u32
length in network byte order, then that many bytes. Keeping one codec means one
set of caps and one set of hostile-input tests. ``Decoder`` is sans-IO (feed
bytes, take frames); ``read_frame`` is the asyncio convenience for a
``StreamReader``-like object.

A declared length above the decoder's ``max_frame`` is a ``ProtocolError``
raised before any of the frame is buffered, so a peer cannot make us hold more
than ``max_frame`` plus one read's worth of bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Protocol

from dwcp.errors import ProtocolError

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_FRAME_LIMIT = (1 << 32) - 1


def encode(payload: bytes | bytearray | memoryview) -> bytes:
    """``payload`` with its length header."""
    n = len(payload)
    if n > MAX_FRAME_LIMIT:
        raise ValueError(f"frame of {n} bytes does not fit a u32 length")
    return HEADER.pack(n) + bytes(payload)


def header(length: int) -> bytes:
    """The header alone, for callers that write the payload separately (no copy)."""
    if not 0 <= length <= MAX_FRAME_LIMIT:
        raise ValueError(f"frame length {length} does not fit a u32")
    return HEADER.pack(length)


class Decoder:
    """Sans-IO: ``feed`` bytes as they arrive, iterate the complete frames."""

    def __init__(self, max_frame: int) -> None:
        if not 0 < max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame must be in 1..{MAX_FRAME_LIMIT}")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # payload length of the frame being read

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame (for per-peer memory caps)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """Append ``data``; yield every frame now complete, in order.

        Raises ``ProtocolError`` on a declared length above ``max_frame``; the
        decoder is then unusable (the stream has lost its framing).
        """
        self._buf += data
        while True:
            if self._need is None:
                if len(self._buf) < HEADER_SIZE:
                    return
                (n,) = HEADER.unpack_from(self._buf)
                if n > self.max_frame:
                    self._buf.clear()
                    raise ProtocolError(
                        f"peer declared a {n}-byte frame; the limit is {self.max_frame}"
                    )
                del self._buf[:HEADER_SIZE]
                self._need = n
            if len(self._buf) < self._need:
                return
            out = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            self._need = None
            yield out


class _Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


async def read_frame(reader: _Reader, max_frame: int) -> bytes:
    """Read one frame from an asyncio-style reader.

    ``asyncio.IncompleteReadError`` (the stream ended mid-frame or before it)
    propagates: the caller knows what end-of-stream means for it. A declared
    length over ``max_frame`` raises ``ProtocolError`` before the payload is read.
    """
    (n,) = HEADER.unpack(await reader.readexactly(HEADER_SIZE))
    if n > max_frame:
        raise ProtocolError(f"peer declared a {n}-byte frame; the limit is {max_frame}")
    return await reader.readexactly(n) if n else b""
