"""Binds migrations to the QUIC transport: authenticated sessions kept warm per peer.

The source opens a session to the peer, a ``migrate`` channel for the control
messages, and one bulk transfer for the delta frames (striped over the
transport's adaptive connections and streams). The destination's server hands
each channel of a session to the node, one migration after another. Frames are
self-describing (``frame_length``), so the receiving side re-splits the bulk
byte stream without extra framing.

A session that carried a migration to its end is kept for ``KEEP_SECONDS``
and reused by the next migration to that peer: a new session costs a QUIC
handshake and, worse over a WAN, a cold congestion controller that needs
several round trips to reach the path's rate, which is most of the time of a
small warm update. A session is used by one migration at a time, so bulk
transfers pair with their channel by order; one that failed is closed.
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
KEEP_SECONDS = 20.0  # below the transport's idle timeout (30 s), which would end it anyway


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
            # finish() sends BulkEnd at once, then waits for the receiver's final ack.
            # The migration's Done message already makes the receiver wait for every
            # frame, so Done need not wait a round trip for that ack: it completes in
            # the background, and the session is kept for reuse only once it did
            # (``reusable``).
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
        with contextlib.suppress(DwcpError):
            self.writer.close()

    async def close(self) -> None:
        if self._finishing is not None:
            self._finishing.cancel()
        with contextlib.suppress(Exception):
            await self.session.close("migration finished")


def _consume(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled():
        fut.exception()


def _consume_any(fut: asyncio.Future[None]) -> None:
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
        self.keep_seconds = KEEP_SECONDS
        # Idle sessions by peer key, each with the timer that closes it.
        self._idle: dict[bytes, list[tuple[Session, asyncio.TimerHandle]]] = {}

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
            while self.accepting and not session.closed:
                try:
                    chan = await session.accept_channel()
                except DwcpError:
                    return  # the peer closed the session (its idle timer) or it was lost
                await self._handler(session.peer, QuicChannel(session, chan.reader, chan.writer))
        finally:
            self.sessions.pop(id(session), None)

    async def open(self, peer: Peer) -> QuicChannel:
        """A migration channel to ``peer`` on a kept or new session; ``TransportError`` if
        the peer is unreachable."""
        from dwcp.transport import connect

        session = self._take_idle(peer.public_key.raw)
        if session is None:
            session = await connect(
                peer.address.host,
                peer.address.port,
                self.key,
                [peer.public_key],
                config=self.config,
            )
        self.sessions[id(session)] = (peer.name, session)
        try:
            chan = await session.open_channel(CHANNEL_NAME)
        except BaseException:  # cancelled too: a session nobody uses must not stay open
            self.sessions.pop(id(session), None)
            await asyncio.shield(session.close("channel failed"))
            raise
        return QuicChannel(session, chan.reader, chan.writer)

    def _take_idle(self, peer: bytes) -> Session | None:
        idle = self._idle.get(peer, [])
        while idle:
            session, timer = idle.pop()
            timer.cancel()
            if not session.closed:
                return session
        return None

    async def release(self, chan: QuicChannel, *, reuse: bool) -> None:
        """Done with ``chan``: keep its session for the next migration, or close it."""
        session = chan.session
        self.sessions.pop(id(session), None)
        if not (reuse and self.accepting and chan.reusable and self.keep_seconds > 0):
            await chan.close()
            return
        chan.end()
        peer = session.peer.raw
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.keep_seconds, self._expire, peer, session)
        self._idle.setdefault(peer, []).append((session, timer))

    def _expire(self, peer: bytes, session: Session) -> None:
        idle = self._idle.get(peer, [])
        for i, (s, _) in enumerate(idle):
            if s is session:
                del idle[i]
                break
        asyncio.ensure_future(session.close("idle", linger=0)).add_done_callback(_consume_any)

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
        idle = [s for entries in self._idle.values() for s, _ in entries]
        for entries in self._idle.values():
            for _, timer in entries:
                timer.cancel()
        self._idle.clear()
        for session in idle:
            with contextlib.suppress(Exception):
                await session.close("node shutting down", linger=0)
        for _, session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await session.close("node shutting down")
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
