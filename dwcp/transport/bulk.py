"""The two ends of a striped bulk transfer, as the application sees them.

``BulkSender`` cuts data into chunks within the receiver's window and hands
them to the session's lanes; ``BulkReceiver`` yields them in order and
acknowledges what the application consumed (the resume offset).
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from dwcp import wire
from dwcp.transport.stripe import Reassembler, SendWindow

if TYPE_CHECKING:
    from dwcp.transport.session import Session


class BulkReceiver:
    """The receiving end of one bulk transfer: ordered chunks via ``read`` or ``async for``.

    ``offset`` is the absolute offset the application has consumed; after a
    lost session, the sender resumes from it (``Session.send(..., offset=)``).
    """

    def __init__(self, session: Session, transfer_id: int, limit: int) -> None:
        self._session = session
        self.transfer_id = transfer_id
        self.reasm = Reassembler(limit)
        self._ready: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._acked = 0
        # Fine-grained enough for progress and resume offsets, coarse enough to be cheap.
        self._ack_every = max(1, min(limit // 8, 1 << 20))

    @property
    def start(self) -> int | None:
        return self.reasm.start

    @property
    def offset(self) -> int:
        return self.reasm.consumed

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read by the application (bounded by the window)."""
        return self.reasm.buffered

    def _deliver(self) -> None:
        ready = self.reasm.pop()
        if ready:
            self._ready.extend(ready)
        waiter = self._waiter
        if (ready or self.reasm.complete) and waiter is not None and not waiter.done():
            waiter.set_result(None)
        # The end may arrive after the application already read the last chunk.
        self._maybe_ack()

    def _maybe_ack(self) -> None:
        """Acknowledge what the application consumed: periodically, and once at the end.

        The final ack goes out as soon as both the end is known and every byte was
        read, whichever happens last, so the sender's ``finish`` never waits for a
        ``read`` that may not come.
        """
        reasm = self.reasm
        consumed = reasm.consumed
        at_end = consumed == reasm.end
        if consumed != self._acked and (at_end or consumed - self._acked >= self._ack_every):
            self._acked = consumed
            self._session._send_control(wire.BulkAck(self.transfer_id, consumed))
        if at_end and self._session._receivers.get(self.transfer_id) is self:
            # Nothing more can arrive for it: free the slot even if read() is never called.
            del self._session._receivers[self.transfer_id]

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """The next chunk in order, or b"" once the transfer is complete."""
        while not self._ready:
            if self.reasm.complete:
                self._session._receivers.pop(self.transfer_id, None)
                return b""
            self._session._check()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._ready.popleft()
        self.reasm.release(len(data))
        self._maybe_ack()
        return data

    def __aiter__(self) -> BulkReceiver:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if not data:
            raise StopAsyncIteration
        return data


class BulkSender:
    """The sending end of one bulk transfer; ``acked`` is what the receiver has consumed."""

    def __init__(self, session: Session, transfer_id: int, offset: int, window: int) -> None:
        self._session = session
        self.transfer_id = transfer_id
        self.window = SendWindow(offset, window)
        self.end: int | None = None
        self.writing = False  # inside write(): more data is coming (not app-limited)
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def acked(self) -> int:
        return self.window.acked

    @property
    def sent(self) -> int:
        return self.window.next_offset

    def _on_ack(self, offset: int) -> None:
        if self.window.ack(offset):
            self._session._wake_progress()
        if self.end is not None and self.window.acked >= self.end and not self._done.done():
            self._done.set_result(None)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Stripe ``data`` over the lanes; returns once it is all handed to QUIC."""
        self.writing = True
        try:
            await self._write(data)
        finally:
            self.writing = False

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        session = self._session
        view = memoryview(data).cast("B")
        chunk = session.config.chunk
        pos = 0
        total = len(view)
        while pos < total:
            session._check()
            room = self.window.room()
            if room <= 0:
                await session._wait_progress()
                continue
            conn, sid = await session._pick_lane()
            size = min(chunk, total - pos, room)
            offset = self.window.take(size)
            quic = conn.quic
            quic.send_stream_data(sid, wire.bulk_data_header(self.transfer_id, offset, size))
            quic.send_stream_data(sid, view[pos : pos + size])  # type: ignore[arg-type]
            conn.transmit_soon()
            pos += size

    async def finish(self) -> int:
        """Mark the end and wait until the receiver has consumed everything; return the end."""
        self.end = self.window.next_offset
        self._session._send_control(wire.BulkEnd(self.transfer_id, self.end))
        if self.window.acked >= self.end and not self._done.done():
            self._done.set_result(None)
        fail = self._session._failed
        await asyncio.wait([self._done, fail], return_when=asyncio.FIRST_COMPLETED)
        if not self._done.done():
            # The receiver's final ack counts even if the session ended right after it.
            self._session._check()
        return self.end
