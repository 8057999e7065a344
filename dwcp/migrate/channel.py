"""The migration's channels: what the glue needs from a link, and the QUIC adapter.

Control messages travel on one ordered ``MessageChannel``, each one length-prefixed
(``dwcp.framing``: u32, network byte order). Data frames go over a separate
high-throughput path when the channel offers one (``BulkChannel``), else as
``Data`` messages on the channel.

A message is read in pieces as it arrives, never with one read of its whole
length: over QUIC the peer gets more flow-control credit only as bytes are
consumed, so waiting for a message larger than the stream window would wait
forever (issue 19, item 1). The protocol keeps messages small anyway (large
objects travel as ``Part`` messages), so ``limit`` bounds what one read may
buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from dwcp import framing
from dwcp.delta import frames as delta_frames
from dwcp.errors import ConnectionLostError, DwcpError, FrameError, ProtocolError, TransportError
from dwcp.migrate import messages as msg
from dwcp.tasks import consume

if TYPE_CHECKING:
    from dwcp.transport import Session

READ_PIECE = 256 * 1024  # the most one read takes from the stream (credit flows back per piece)


class MessageChannel(Protocol):
    """An ordered, reliable message channel between the two nodes."""

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes:
        """The next message; raises ``ConnectionLostError`` when the peer is gone."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class BulkChannel(MessageChannel, Protocol):
    """A channel with a separate high-throughput path for data frames."""

    async def send_frames(self, frames: AsyncIterator[bytes]) -> None:
        """Send every frame, in order, over the bulk path; return when all are handed over."""
        ...

    def recv_frames(self) -> AsyncIterator[bytes]:
        """The frames the peer sends over the bulk path, in order."""
        ...


class StreamReaderLike(Protocol):
    async def read(self, n: int = -1) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...


class StreamWriterLike(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class FramedChannel:
    """``MessageChannel`` over a byte stream: each message is a ``dwcp.framing`` frame."""

    def __init__(
        self, reader: StreamReaderLike, writer: StreamWriterLike, *, limit: int = msg.MAX_MESSAGE
    ) -> None:
        self.reader, self.writer, self.limit = reader, writer, limit

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(framing.header(len(data)))
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionLostError(f"cannot send to the peer: {exc}") from exc

    async def recv(self) -> bytes:
        try:
            (n,) = framing.HEADER.unpack(await self.reader.readexactly(framing.HEADER_SIZE))
            if n > self.limit:
                raise ProtocolError(f"message of {n} bytes exceeds the {self.limit}-byte limit")
            return await self._read_body(n)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionLostError("the peer closed the channel") from exc
        except (ConnectionError, OSError) as exc:
            raise ConnectionLostError(f"cannot receive from the peer: {exc}") from exc

    async def _read_body(self, n: int) -> bytes:
        if n <= READ_PIECE:
            return await self.reader.readexactly(n) if n else b""
        buf = bytearray()
        while len(buf) < n:
            piece = await self.reader.read(min(READ_PIECE, n - len(buf)))
            if not piece:
                raise asyncio.IncompleteReadError(bytes(buf), n)
            buf += piece
        return bytes(buf)

    async def close(self) -> None:
        try:
            self.writer.close()
        except (DwcpError, OSError):
            return


class QuicChannel(FramedChannel):
    """A ``BulkChannel``: control messages on a QUIC channel, frames over bulk streams.

    Frames are self-describing (``delta.frames.frame_length``), so the receiving
    side re-splits the bulk byte stream without extra framing.
    """

    def __init__(self, session: Session, reader: Any, writer: Any) -> None:
        super().__init__(reader, writer)
        self.session = session
        self._finishing: asyncio.Future[int] | None = None

    async def send(self, data: bytes) -> None:
        try:
            await super().send(data)
        except TransportError as exc:
            raise ConnectionLostError(str(exc)) from exc

    async def recv(self) -> bytes:
        try:
            return await super().recv()
        except TransportError as exc:
            raise ConnectionLostError(str(exc)) from exc

    async def send_frames(self, frames: AsyncIterator[bytes]) -> None:
        try:
            sender = self.session.open_bulk()
            async for frame in frames:
                await sender.write(frame)
            # finish() sends BulkEnd at once, then waits for the receiver's final ack.
            # The migration's Done message already makes the receiver wait for every
            # frame, so Done need not wait a round trip for that ack: it completes in
            # the background, and the session is kept for reuse only once it did
            # (``reusable``).
            self._finishing = asyncio.ensure_future(sender.finish())
            self._finishing.add_done_callback(consume)
            await asyncio.sleep(0)
        except TransportError as exc:
            raise ConnectionLostError(str(exc)) from exc

    async def recv_frames(self) -> AsyncIterator[bytes]:
        try:
            receiver = await self.session.accept_bulk()
            buf = bytearray()
            async for chunk in receiver:
                buf += chunk
                while len(buf) >= delta_frames.HEADER_SIZE:
                    n = delta_frames.frame_length(bytes(buf[: delta_frames.HEADER_SIZE]))
                    if len(buf) < n:
                        break
                    frame = bytes(buf[:n])
                    del buf[:n]
                    yield frame
            if buf:
                raise FrameError(f"the bulk stream ended inside a frame ({len(buf)} bytes left)")
        except TransportError as exc:
            raise ConnectionLostError(str(exc)) from exc

    @property
    def reusable(self) -> bool:
        """True once everything this channel sent was consumed and the session is alive."""
        done = self._finishing is None or (
            self._finishing.done()
            and not self._finishing.cancelled()
            and self._finishing.exception() is None
        )
        return done and not self.session.closed

    def end(self) -> None:
        """End this channel only (the session stays open for the next migration)."""
        try:
            self.writer.close()
        except DwcpError:
            return

    def abandon(self) -> None:
        """Stop waiting for the bulk transfer's final ack (the session is not reused)."""
        if self._finishing is not None:
            self._finishing.cancel()

    async def close(self) -> None:
        """End the channel and its session (a failed migration's session is not reused)."""
        self.abandon()
        try:
            await self.session.close("migration finished")
        except (DwcpError, OSError):
            return
