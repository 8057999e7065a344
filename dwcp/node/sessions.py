"""The node's authenticated QUIC sessions: a server for peers, warm sessions to them.

Incoming: each channel a peer opens is handed to the handler registered for
its name (``add_channel_handler``), one channel after another per session (a
migration pairs its bulk transfer with its channel by order, so two at once on
one session would mix them up). Requests (``session.request``) are dispatched
by the kind before their first newline (``add_request_handler``); ``ping``
is built in.

Outgoing: a session that carried a migration to its end is kept for
``KEEP_SECONDS`` and reused by the next one to that peer: a new session costs a
QUIC handshake and, worse over a WAN, a cold congestion controller that needs
several round trips to reach the path's rate. A new session to a peer this node
has a path history for (``dwcp.pba.paths``, when ``paths`` is set) starts at the
connections x streams its last session ended on instead of probing up from
one; every session's measurements are added to that history when it is
checked in. A kept session is checked before
it is reused: a peer killed and restarted meanwhile no longer knows it, and
would leave the next migration waiting for the idle timeout (issue 19, item 3).
The check (one ``ping`` request, ``check_timeout``) runs while the source scans
the image; a session that fails it is dropped and a new one opened, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from dwcp.errors import DwcpError, RemoteError
from dwcp.identity import NodeKey, PublicKey
from dwcp.node.bindinfo import bind_error
from dwcp.node.config import Address, Peer
from dwcp.node.metrics import LinkStats
from dwcp.node.service import BaseService
from dwcp.pba.paths import PathStore, to_seconds
from dwcp.tasks import TaskSet, consume

if TYPE_CHECKING:
    from dwcp.transport import Channel, Server, Session, TransportConfig

log = logging.getLogger("dwcp.node")

KEEP_SECONDS = 20.0  # below the transport's idle timeout (30 s), which would end it anyway
CHECK_SECONDS = 1.0  # least time a kept session gets to answer the check (3 RTTs if more)
CLOSE_SECONDS = 5.0  # bound on waiting for the server's sockets to close

ChannelHandler = Callable[[PublicKey, "Session", "Channel"], Awaitable[None]]
RequestHandler = Callable[[PublicKey, bytes], Awaitable[bytes]]


async def _pong(peer: PublicKey, body: bytes) -> bytes:
    return b"pong"


class PeerSessions(BaseService):
    """The node's transport: a server for incoming channels, warm sessions for outgoing ones."""

    name = "sessions"

    def __init__(
        self,
        key: NodeKey,
        listen: Address,
        trusted: Callable[[], list[PublicKey]],
        config: TransportConfig | None = None,
    ) -> None:
        self.key = key
        self.listen = listen
        self.config = config
        self._trusted = trusted
        self.server: Server | None = None
        self.sessions: dict[int, tuple[str, Session]] = {}  # live sessions, for links()
        self.accepting = True
        self.keep_seconds = KEEP_SECONDS
        self.check_seconds = CHECK_SECONDS
        self._channels: dict[str, ChannelHandler] = {}
        self._requests: dict[str, RequestHandler] = {"ping": _pong}
        # Kept sessions by peer key, each with the timer that closes it.
        self._idle: dict[bytes, list[tuple[Session, asyncio.TimerHandle]]] = {}
        self._closing = TaskSet("session closes")
        self._stopped = False
        self.paths: PathStore | None = None  # per-peer history: warm starts (dwcp.pba.paths)
        self._recorded: dict[int, float] = {}  # session -> its last sample already recorded

    # --- registries -------------------------------------------------------------------

    def add_channel_handler(self, name: str, handler: ChannelHandler) -> None:
        """Serve every channel a peer opens under ``name`` with ``handler``."""
        if name in self._channels:
            raise ValueError(f"channel {name!r} already has a handler")
        self._channels[name] = handler

    def add_request_handler(self, kind: str, handler: RequestHandler) -> None:
        """Answer ``session.request(kind.encode() + b"\\n" + body)`` with ``handler``."""
        if "\n" in kind or kind in self._requests:
            raise ValueError(f"request kind {kind!r} is taken or invalid")
        self._requests[kind] = handler

    # --- lifetime ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.update_trust(self._trusted())

    async def reload(self) -> None:
        await self.update_trust(self._trusted())

    async def drain(self, deadline: float) -> None:
        self.accepting = False

    async def stop(self) -> None:
        await self.close()

    async def update_trust(self, trusted: list[PublicKey]) -> None:
        """Listen once there is anyone to trust (the transport refuses an empty trust set)."""
        from dwcp.transport import serve

        if self.server is not None:
            self.server.trusted = frozenset(trusted)  # checked on every new connection
        elif trusted:
            try:
                self.server = await serve(
                    self.listen.host,
                    self.listen.port,
                    self.key,
                    trusted,
                    self._on_session,
                    config=self.config,
                    on_request=self._on_request,
                )
            except OSError as exc:
                raise bind_error(exc, self.listen.host, self.listen.port) from exc

    # --- incoming ---------------------------------------------------------------------

    async def _on_request(self, session: Session, body: bytes) -> bytes:
        raw, _, rest = body.partition(b"\n")
        kind = raw[:40].decode("ascii", "replace")
        handler = self._requests.get(kind)
        if handler is None:
            raise RemoteError("refused", f"this node answers no {kind!r} requests")
        return await handler(session.peer, rest)

    async def _on_session(self, session: Session) -> None:
        if not self.accepting:
            await session.close("node shutting down")
            return
        self.sessions[id(session)] = (session.peer.node_id, session)
        try:
            while self.accepting and not session.closed:
                try:
                    chan = await session.accept_channel()
                except DwcpError:
                    return  # the peer closed the session (its idle timer) or it was lost
                handler = self._channels.get(chan.name)
                if handler is None:
                    log.warning(
                        "peer %s opened an unknown channel %r; closed it",
                        session.peer.node_id,
                        chan.name[:80],
                        extra={"event": "unknown_channel"},
                    )
                    chan.writer.close()
                    continue
                await handler(session.peer, session, chan)
        finally:
            self.sessions.pop(id(session), None)

    # --- outgoing ---------------------------------------------------------------------

    async def checkout(self, peer: Peer) -> Session:
        """A session to ``peer``: a kept one that still answers, or a new one
        (``TransportError``/``AuthenticationError`` if the peer is unreachable)."""
        from dwcp.transport import connect

        session = await self._take_checked(peer.public_key.raw)
        if session is None:
            session = await connect(
                peer.address.host,
                peer.address.port,
                self.key,
                [peer.public_key],
                config=await self.warm_config(peer),
            )
        self.sessions[id(session)] = (peer.name, session)
        return session

    async def _take_checked(self, peer: bytes) -> Session | None:
        idle = self._idle.get(peer, [])
        while idle:
            session, timer = idle.pop()
            timer.cancel()
            if session.closed:
                continue
            rtt = session.stats().rtt_ms / 1000
            try:
                await session.request(b"ping\n", timeout=max(self.check_seconds, 3 * rtt))
            except (DwcpError, TimeoutError) as exc:
                log.info(
                    "a kept session to %s did not answer (%s); opening a new one",
                    session.peer.node_id,
                    type(exc).__name__,
                    extra={"event": "stale_session"},
                )
                self._close_later(session, "stale")
                continue
            return session
        return None

    async def warm_config(self, peer: Peer) -> TransportConfig | None:
        """The transport config for a new session: at the level the path's history knows."""
        if self.paths is None:
            return self.config
        from dataclasses import replace

        from dwcp.transport import TransportConfig

        rec = await asyncio.to_thread(self.paths.get, peer.public_key.node_id)
        if rec is None or rec.level is None:
            return self.config
        conns, streams = rec.level
        base = self.config or TransportConfig()
        warm = replace(base, initial_connections=conns, initial_streams=streams)
        hint = rec.resume_hint(time.time())
        if hint is not None and warm.congestion == "dwcp-bbr":
            # Careful resume: the congestion controller starts near the known rate.
            warm = replace(warm, resume_bps=hint[0], resume_rtt=hint[1])
        return warm

    def _record(self, session: Session, name: str) -> None:
        """Add the session's new measurements to its peer's path history (in a thread)."""
        if self.paths is None or self._stopped:
            return
        snap = session.snapshot()
        seen = id(session) in self._recorded
        last = self._recorded.get(id(session), -1.0)
        samples = [s for s, _ in snap.history if s.now > last]
        if not samples and seen:
            return
        # A session too short for one measured interval (a small image on a fast path) still
        # records its peer's name and the level it used, once: the path is known to exist.
        self._recorded[id(session)] = samples[-1].now if samples else last
        seconds = to_seconds(samples, time.time())
        if snap.decision is not None:
            level: tuple[int, int] | None = (snap.decision.connections, snap.decision.streams)
        else:  # no interval measured yet: the shape the session ran with
            st = session.stats()
            level = (st.connections, st.streams) if st.connections else None
        work = asyncio.to_thread(
            self.paths.record_session, session.peer.node_id, seconds, name=name, level=level
        )
        self._closing.spawn(work, name="path history")

    def checkin(self, session: Session, *, reuse: bool) -> None:
        """Done with ``session``: keep it for the next migration to its peer, or close it."""
        name = self.sessions.pop(id(session), ("", None))[0]
        try:
            self._record(session, name)
        except OSError as exc:  # history is an optimisation: never fail a migration over it
            log.warning("could not record the path history: %s", exc)
        if not (reuse and self.accepting and not session.closed and self.keep_seconds > 0):
            self._close_later(session, "migration finished", linger=5.0)
            return
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
        self._close_later(session, "idle")

    def _close_later(self, session: Session, reason: str, *, linger: float = 0.0) -> None:
        self._recorded.pop(id(session), None)
        """Close in the background (a linger must not hold up the migration's result)."""
        if self._stopped:  # close() already waited for the others: nothing to wait for this
            asyncio.ensure_future(session.close(reason, linger=0)).add_done_callback(consume)
        else:
            self._closing.spawn(session.close(reason, linger=linger), name="session close")

    async def probe(self, peer: Peer, timeout: float = 3.0) -> float | None:
        """Seconds to establish an authenticated session with ``peer``, or None."""
        from dwcp.transport import TransportConfig, connect

        light = TransportConfig(initial_connections=1, initial_streams=1, max_connections=1)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                session = await connect(
                    peer.address.host, peer.address.port, self.key, [peer.public_key], config=light
                )
        except (DwcpError, OSError, TimeoutError):
            return None
        elapsed = time.monotonic() - t0
        with contextlib.suppress(DwcpError):
            await session.close("probe")
        return elapsed

    def links(self) -> list[LinkStats]:
        out = []
        for name, session in list(self.sessions.values()):
            if session.closed:
                continue
            st = session.stats()
            out.append(LinkStats(name, st.streams, st.rtt_ms / 1000 if st.rtt_ms else None))
        return out

    async def close(self) -> None:
        """Close every session (kept, outgoing and incoming) and the server."""
        self.accepting = False
        self._stopped = True
        idle = [s for entries in self._idle.values() for s, _ in entries]
        for entries in self._idle.values():
            for _, timer in entries:
                timer.cancel()
        self._idle.clear()
        live = [s for _, s in self.sessions.values()]
        closes = [asyncio.ensure_future(s.close("node shutting down", linger=0)) for s in idle]
        closes += [asyncio.ensure_future(s.close("node shutting down")) for s in live]
        for fut in closes:
            fut.add_done_callback(consume)
        if closes:
            await asyncio.wait(closes)
        await self._closing.aclose()
        if self.server is not None:
            self.server.close()
            try:
                async with asyncio.timeout(CLOSE_SECONDS):
                    await self.server.wait_closed()
            except TimeoutError:
                log.warning(
                    "the transport server did not close in time", extra={"event": "slow_close"}
                )
