"""Binds migrations to the QUIC transport: one authenticated session per migration.

The source opens a session to the peer, a ``migrate`` channel for the control
messages, and one bulk transfer for the delta frames (striped over the
transport's adaptive connections and streams). The destination's server hands
each new session to the node. Frames are self-describing (``frame_length``),
so the receiving side re-splits the bulk byte stream without extra framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dwcp.delta import frames as delta_frames
from dwcp.errors import ConnectionLostError, DwcpError, FrameError, TransportError
from dwcp.identity import NodeKey, PublicKey
from dwcp.migrate.aio import FramedChannel
from dwcp.node.config import Address, Peer
from dwcp.node.metrics import LinkStats

if TYPE_CHECKING:
    from dwcp.transport import Server, Session, TransportConfig

CHANNEL_NAME = "dwcp-migrate/1"


class QuicChannel(FramedChannel):
    """A ``BulkChannel``: control messages on a QUIC channel, frames over bulk streams."""

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
            # finish() sends BulkEnd at once, then waits for the receiver's final ack,
            # which the transport may not send when the end arrives after the last
            # chunk was read. The migration's Done message already makes the
            # receiver wait for every frame, so do not wait for that ack here.
            self._finishing = asyncio.ensure_future(sender.finish())
            self._finishing.add_done_callback(_consume)
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

    async def close(self) -> None:
        if self._finishing is not None:
            self._finishing.cancel()
        with contextlib.suppress(Exception):
            await self.session.close("migration finished")


def _consume(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled():
        fut.exception()


SessionHandler = Callable[[PublicKey, QuicChannel], Awaitable[None]]


class NodeLink:
    """The node's transport: a server for incoming migrations, sessions for outgoing ones."""

    def __init__(self, key: NodeKey, listen: Address, config: TransportConfig | None = None):
        self.key = key
        self.listen = listen
        self.config = config
        self.server: Server | None = None
        self.sessions: dict[int, tuple[str, Session]] = {}
        self._handler: SessionHandler | None = None
        self.accepting = True

    async def start(self, trusted: list[PublicKey], handler: SessionHandler) -> None:
        """Listen if there is anyone to trust (the transport refuses an empty trust set)."""
        self._handler = handler
        await self.update_trust(trusted)

    async def update_trust(self, trusted: list[PublicKey]) -> None:
        from dwcp.transport import serve

        if self.server is not None:
            self.server.trusted = frozenset(trusted)  # checked on every new connection
        elif trusted:
            self.server = await serve(
                self.listen.host,
                self.listen.port,
                self.key,
                trusted,
                self._on_session,
                config=self.config,
            )

    async def _on_session(self, session: Session) -> None:
        if not self.accepting or self._handler is None:
            await session.close("node shutting down")
            return
        self.sessions[id(session)] = (session.peer.node_id, session)
        try:
            chan = await session.accept_channel()
            await self._handler(session.peer, QuicChannel(session, chan.reader, chan.writer))
        finally:
            self.sessions.pop(id(session), None)

    async def open(self, peer: Peer) -> QuicChannel:
        """A session and migration channel to ``peer``; ``TransportError`` if unreachable."""
        from dwcp.transport import connect

        session = await connect(
            peer.address.host, peer.address.port, self.key, [peer.public_key], config=self.config
        )
        self.sessions[id(session)] = (peer.name, session)
        try:
            chan = await session.open_channel(CHANNEL_NAME)
        except DwcpError:
            self.sessions.pop(id(session), None)
            await session.close("channel failed")
            raise
        return QuicChannel(session, chan.reader, chan.writer)

    def forget(self, chan: QuicChannel) -> None:
        self.sessions.pop(id(chan.session), None)

    async def probe(self, peer: Peer, timeout: float = 3.0) -> float | None:
        """Seconds to establish an authenticated session with ``peer``, or None."""
        from dwcp.transport import TransportConfig, connect

        light = TransportConfig(initial_connections=1, initial_streams=1, max_connections=1)
        t0 = time.monotonic()
        try:
            session = await asyncio.wait_for(
                connect(
                    peer.address.host,
                    peer.address.port,
                    self.key,
                    [peer.public_key],
                    config=light,
                ),
                timeout,
            )
        except (DwcpError, OSError, TimeoutError):
            return None
        elapsed = time.monotonic() - t0
        with contextlib.suppress(Exception):
            await session.close("probe")
        return elapsed

    def links(self) -> list[LinkStats]:
        out = []
        for name, session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                st = session.stats()
                out.append(LinkStats(name, st.streams, st.rtt_ms / 1000 if st.rtt_ms else None))
        return out

    async def close(self) -> None:
        self.accepting = False
        for _, session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await session.close("node shutting down")
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
