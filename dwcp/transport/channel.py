"""Ordered byte channels over one QUIC stream each, shaped like asyncio's streams.

``ChannelReader`` and ``ChannelWriter`` offer the parts of asyncio's
``StreamReader`` / ``StreamWriter`` that make sense over a channel (read,
readexactly, readuntil, readline, async iteration by line; write, writelines,
drain, write_eof, close, wait_closed, get_extra_info("peer_key")), so code
written for asyncio streams runs over a channel unchanged.

Back-pressure both ways: the reader's consumption is what grants the peer
more QUIC credit (the stream is "paced"), so a slow reader bounds the bytes
buffered here by the stream window; ``drain`` waits while the stream's send
buffer is above its high-water mark. A read larger than the window still
completes: ``readexactly`` moves what arrived into its result as it goes,
which grants credit for the rest. Cancelling a pending read loses nothing:
bytes already taken are put back.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any

from dwcp.errors import DwcpError, UsageError
from dwcp.transport.events import StreamKey
from dwcp.transport.port import SessionPort


class ChannelReader:
    """Ordered bytes from the peer; consuming them grants the peer more QUIC credit."""

    def __init__(self, port: SessionPort, key: StreamKey, limit: int) -> None:
        self._port = port
        self._key = key
        self._limit = limit  # longest line readuntil looks for (asyncio's ``limit``)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    # --- fed by the session ---------------------------------------------------

    def feed_data(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._size += len(data)
            self.wake()

    def feed_eof(self) -> None:
        self._eof = True
        self.wake()

    def wake(self) -> None:
        """Something changed (data, end of stream, end of session): re-check."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- reading ----------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (bounded by the stream window)."""
        return self._size

    def at_eof(self) -> bool:
        return self._eof and not self._size

    async def _wait(self) -> None:
        self._port.check()
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
        if got:
            self._port.core.channel_consumed(self._key, got)
            self._port.flush()
        return b"".join(out)

    def _unread(self, data: bytes) -> None:
        """Put back bytes taken by a read that did not complete (their credit stays granted)."""
        if data:
            self._chunks.appendleft(data)
            self._size += len(data)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``n`` < 0: everything until the end); b"" at end of stream."""
        if n == 0:
            return b""
        if n > 0:
            while not self._size and not self._eof:
                await self._wait()
            return self._take(n)
        parts: list[bytes] = []
        try:
            while not self._eof or self._size:
                if self._size:
                    parts.append(self._take(self._size))
                else:
                    await self._wait()
        except BaseException:
            self._unread(b"".join(parts))
            raise
        return b"".join(parts)

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ``asyncio.IncompleteReadError`` if the stream ends first."""
        if n < 0:
            raise UsageError("readexactly needs a non-negative size")
        parts: list[bytes] = []
        got = 0
        try:
            while got < n:
                if self._size:
                    part = self._take(min(self._size, n - got))
                    parts.append(part)
                    got += len(part)
                elif self._eof:
                    raise asyncio.IncompleteReadError(b"".join(parts), n)
                else:
                    await self._wait()
        except asyncio.IncompleteReadError:
            raise
        except BaseException:
            self._unread(b"".join(parts))
            raise
        return b"".join(parts)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Bytes up to and including ``separator`` (asyncio's errors at the limit or the end)."""
        if not separator:
            raise UsageError("readuntil needs a non-empty separator")
        scanned = 0
        while True:
            if self._size:
                if len(self._chunks) > 1:
                    self._chunks = collections.deque([b"".join(self._chunks)])
                buf = self._chunks[0]
                at = buf.find(separator, scanned)
                if at >= 0:
                    end = at + len(separator)
                    if end > self._limit:
                        raise asyncio.LimitOverrunError("separator found past the limit", at)
                    return self._take(end)
                if len(buf) >= self._limit:  # the peer has no credit left: it would never come
                    raise asyncio.LimitOverrunError("no separator within the limit", len(buf))
                scanned = max(0, len(buf) - len(separator) + 1)
            if self._eof:
                partial = self._take(self._size)
                raise asyncio.IncompleteReadError(partial, None)
            await self._wait()

    async def readline(self) -> bytes:
        """One line with its b"\\n" (the rest of the stream at its end); ValueError if too long."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            raise ValueError(f"channel line longer than {self._limit} bytes") from exc

    def __aiter__(self) -> ChannelReader:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class ChannelWriter:
    """Writes to a channel; ``drain`` waits while the stream's send buffer is full."""

    def __init__(self, port: SessionPort, key: StreamKey, name: str, high: int) -> None:
        self._port = port
        self._key = key
        self._name = name
        self._high = high
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._port.check()
        if self._closed:
            raise UsageError(f"channel {self._name!r} was closed for writing")
        self._port.core.channel_write(self._key, bytes(data))
        self._port.flush()

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    async def drain(self) -> None:
        """Wait until the unacknowledged data on this stream drops below the high-water mark."""
        self._port.check()
        while self._port.core.channel_unacked(self._key) > self._high:
            await self._port.wait_progress()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """End this direction of the channel (the peer's reader sees the end of stream)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._port.check()
        except DwcpError:
            return  # the session ended: there is nobody to tell
        self._port.core.channel_write(self._key, b"", end_stream=True)
        self._port.flush()

    def close(self) -> None:
        self.write_eof()

    def is_closing(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        """Wait until the peer acknowledged everything written, or the session ended."""
        try:
            while self._port.core.channel_unacked(self._key) > 0:
                await self._port.wait_progress()
        except DwcpError:
            return  # the session ended: nothing more will be acknowledged

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peer_key`` (the peer's PublicKey), ``channel`` (its name) or ``stream_id``."""
        info = {"peer_key": self._port.peer, "channel": self._name, "stream_id": self._key.stream}
        return info.get(name, default)


@dataclass
class Channel:
    """An ordered, flow-controlled byte channel (one bidirectional QUIC stream)."""

    name: str
    reader: ChannelReader
    writer: ChannelWriter
