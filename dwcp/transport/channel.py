"""Ordered byte channels over one QUIC stream each, with back-pressure both ways.

The reader's consumption is what grants the peer more QUIC credit (the stream
is "paced" in ``quic.DwcpQuicConnection``), so a slow reader bounds the bytes
buffered here by the stream window; ``drain`` waits while the stream's send
buffer is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dwcp.transport.aio import Conn

if TYPE_CHECKING:
    from dwcp.transport.session import Session


class ChannelReader:
    """Ordered bytes from the peer; consuming them grants the peer more QUIC credit."""

    def __init__(self, session: Session, conn: Conn, stream_id: int) -> None:
        self._session = session
        self._conn = conn
        self._sid = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (bounded by the stream window)."""
        return self._size

    def _feed(self, data: bytes, fin: bool) -> None:
        if data:
            self._chunks.append(data)
            self._size += len(data)
        if fin:
            self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def at_eof(self) -> bool:
        return self._eof and not self._size

    async def _wait(self) -> None:
        self._session._check()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take(self, n: int) -> bytes:
        out = []
        got = 0
        while self._chunks and got < n:
            head = self._chunks[0]
            if len(head) <= n - got:
                out.append(self._chunks.popleft())
                got += len(head)
            else:
                cut = n - got
                out.append(head[:cut])
                self._chunks[0] = head[cut:]
                got += cut
        self._size -= got
        if self._conn.quic.consume(self._sid, got):
            self._conn.transmit_soon()
        return b"".join(out)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all buffered if ``n`` < 0); b"" at end of stream."""
        while not self._size and not self._eof:
            await self._wait()
        return self._take(self._size if n < 0 else n)

    async def readexactly(self, n: int) -> bytes:
        while self._size < n:
            if self._eof:
                raise asyncio.IncompleteReadError(self._take(self._size), n)
            await self._wait()
        return self._take(n)


class ChannelWriter:
    """Writes to a channel; ``drain`` waits while the stream's send buffer is full."""

    def __init__(self, session: Session, conn: Conn, stream_id: int, high: int) -> None:
        self._session = session
        self._conn = conn
        self._sid = stream_id
        self._high = high
        self._closed = False

    def write(self, data: bytes) -> None:
        self._session._check()
        self._conn.quic.send_stream_data(self._sid, bytes(data))
        self._conn.transmit_soon()

    async def drain(self) -> None:
        """Wait until the unacknowledged data on this stream drops below the high-water mark."""
        while self._conn.quic.send_buffered(self._sid) > self._high:
            await self._session._wait_progress()

    def write_eof(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._conn.closed:
                self._conn.quic.send_stream_data(self._sid, b"", end_stream=True)
                self._conn.transmit_soon()

    def close(self) -> None:
        self.write_eof()

    def is_closing(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        await self.drain()


@dataclass
class Channel:
    """An ordered, flow-controlled byte channel (one bidirectional QUIC stream)."""

    name: str
    reader: ChannelReader
    writer: ChannelWriter
