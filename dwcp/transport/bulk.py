"""The two ends of a striped bulk transfer, as the application sees them.

``BulkSender`` hands data to the session core's lanes within the receiver's
window; ``BulkReceiver`` yields it in order and acknowledges what the
application consumed (the resume offset). The protocol state lives in the
core (``transfers.Outgoing`` / ``transfers.Incoming``); these only wait.
Cancelling a pending ``read`` or ``finish`` leaves the transfer and the
session as they were; cancelling a ``write`` leaves the bytes already handed
over (``sent``) in the transfer.
"""

from __future__ import annotations

import asyncio

from dwcp.transport.port import SessionPort
from dwcp.transport.transfers import Incoming, Outgoing


class _Waiter:
    """One pending wait at a time, woken by the session."""

    __slots__ = ("_fut",)

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)

    async def wait(self) -> None:
        self._fut = asyncio.get_running_loop().create_future()
        try:
            await self._fut
        finally:
            self._fut = None


class BulkReceiver:
    """The receiving end of one bulk transfer: ordered chunks via ``read`` or ``async for``.

    ``offset`` is the absolute offset the application has consumed; after a
    lost session, the sender resumes from it (``Session.send(..., offset=)``).
    """

    def __init__(self, port: SessionPort, state: Incoming) -> None:
        self._port = port
        self._state = state
        self._waiter = _Waiter()
        self.transfer_id = state.transfer_id

    @property
    def start(self) -> int | None:
        return self._state.start

    @property
    def offset(self) -> int:
        return self._state.offset

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read by the application (bounded by the window)."""
        return self._state.buffered

    def wake(self) -> None:
        """Called by the session: data or the end arrived, or the session ended."""
        self._waiter.wake()

    async def read(self) -> bytes:
        """The next chunk in order, or b"" once the transfer is complete."""
        transfers = self._port.core.transfers
        while True:
            data = transfers.read(self._state)
            if data is not None:
                self._port.flush()  # an acknowledgement may be queued
                return data
            self._port.check()
            await self._waiter.wait()

    def __aiter__(self) -> BulkReceiver:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if not data:
            raise StopAsyncIteration
        return data


class BulkSender:
    """The sending end of one bulk transfer; ``acked`` is what the receiver has consumed."""

    def __init__(self, port: SessionPort, state: Outgoing) -> None:
        self._port = port
        self._state = state
        self._waiter = _Waiter()
        self.transfer_id = state.transfer_id

    @property
    def acked(self) -> int:
        return self._state.acked

    @property
    def sent(self) -> int:
        return self._state.sent

    @property
    def end(self) -> int | None:
        return self._state.end

    def wake(self) -> None:
        """Called by the session: the receiver acknowledged more, or the session ended."""
        self._waiter.wake()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Stripe ``data`` over the lanes; returns once it is all handed to QUIC."""
        port = self._port
        transfers = port.core.transfers
        view = memoryview(data).cast("B")
        self._state.writing = True  # more data is coming: the sender is not app-limited
        try:
            pos = 0
            while pos < len(view):
                port.check()
                n = transfers.send(self._state, view[pos:])
                if n:
                    pos += n
                    port.flush()
                else:
                    await port.wait_progress()
        finally:
            self._state.writing = False

    async def finish(self) -> int:
        """Mark the end and wait until the receiver has consumed everything; return the end."""
        end = self._port.core.transfers.finish(self._state)
        self._port.flush()
        # The receiver's final ack counts even if the session ended right after it.
        while not self._state.complete:
            self._port.check()
            await self._waiter.wait()
        return end
