"""A session between two nodes, in asyncio: futures, queues and tasks over ``core.SessionCore``.

The protocol (stream kinds, demux, lanes, windows, peer limits, adaptation
decisions) is the sans-IO core's; this layer turns its events into resolved
futures and woken end-points, runs request handlers and the adaptation timer
as tasks, and transmits what the core wrote. If any connection of the session
fails, the whole session fails with a typed ``TransportError``; callers
reconnect and resume from the receiver's offset.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from dwcp import wire
from dwcp.errors import (
    ConnectionLostError,
    DwcpError,
    RemoteError,
    SessionClosedError,
)
from dwcp.identity import PublicKey
from dwcp.pba.parallelism import Snapshot
from dwcp.tasks import TaskSet, cancel_and_wait
from dwcp.transport import events as ev
from dwcp.transport.aio import Conn, now
from dwcp.transport.bulk import BulkReceiver, BulkSender
from dwcp.transport.channel import Channel, ChannelReader, ChannelWriter
from dwcp.transport.config import TransportConfig
from dwcp.transport.core import (
    CONTROL_STREAM,
    SessionCore,
    SessionStats,
    TimelinePoint,
)

__all__ = ["CONTROL_STREAM", "ConnOpener", "Session", "SessionStats", "TimelinePoint"]

log = logging.getLogger("dwcp.transport")

_T = TypeVar("_T")
RequestHandler = Callable[["Session", bytes], Awaitable[bytes]]
# Opens connection ``index`` of a session (the client's extra connections).
ConnOpener = Callable[["Session", int], Awaitable[Conn]]
# Seconds ``close`` waits by default for written data to be acknowledged.
LINGER = 5.0


class Session:
    """An authenticated session with one peer node (see the package docstring for the API)."""

    def __init__(
        self,
        *,
        session_id: bytes,
        primary: Conn,
        peer: PublicKey,
        is_client: bool,
        config: TransportConfig,
        on_request: RequestHandler | None,
        opener: ConnOpener | None = None,
        peer_window: int | None = None,
    ) -> None:
        self.session_id = session_id
        self._peer = peer
        self.is_client = is_client
        self.config = config
        self._core = SessionCore(config, is_client=is_client, peer_window=peer_window)
        self._on_request = on_request
        self._opener = opener
        self._loop = asyncio.get_running_loop()
        self.conns: list[Conn] = []
        self._requests: dict[ev.StreamKey, asyncio.Future[bytes]] = {}
        self._channels: dict[ev.StreamKey, Channel] = {}
        self._new_channels: collections.deque[Channel] = collections.deque()
        self._new_bulk: collections.deque[BulkReceiver] = collections.deque()
        self._arrived: asyncio.Future[None] | None = None
        self._receivers: dict[int, BulkReceiver] = {}
        self._senders: dict[int, BulkSender] = {}
        self._progress: asyncio.Future[None] | None = None
        self._failed: asyncio.Future[None] = self._loop.create_future()
        self.error: DwcpError | None = None
        self._tasks = TaskSet("session tasks")
        self._adapting = False
        self._opening = 0
        self.attach(primary)

    # --- the port end-points use (port.SessionPort) ------------------------------

    @property
    def core(self) -> SessionCore:
        return self._core

    @property
    def peer(self) -> PublicKey:
        return self._peer

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        conns = self.conns
        for index in self._core.take_touched():
            conns[index].transmit_soon()

    async def wait_progress(self) -> None:
        self.check()
        if self._progress is None:
            self._progress = self._loop.create_future()
        await asyncio.wait([self._progress, self._failed], return_when=asyncio.FIRST_COMPLETED)
        self.check()

    def _wake_progress(self) -> None:
        fut, self._progress = self._progress, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    # --- connections (aio.ConnListener) ----------------------------------------

    def attach(self, conn: Conn) -> None:
        """Add a connection (the primary first) that has said Hello for this session."""
        conn.index = self._core.add_connection(conn.quic)
        conn.listener = self
        transfers = self._core.transfers
        conn.quic.app_has_more = lambda: transfers.writing
        self.conns.append(conn)

    def adopt_control(self, conn: Conn, decoder: wire.FrameDecoder) -> None:
        """Take over a connection's control stream after its Hello was read."""
        self._handle(self._core.adopt_control(conn.index, decoder))

    def stream_data(self, conn: Conn, stream_id: int, data: bytes, fin: bool) -> None:
        self._handle(self._core.receive(conn.index, stream_id, data, fin))

    def stream_reset(self, conn: Conn, stream_id: int) -> None:
        self._handle(self._core.reset(conn.index, stream_id))

    def terminated(self, conn: Conn, error: DwcpError) -> None:
        self._fail(error)

    def progress(self, conn: Conn) -> None:
        """Called after each batch of datagrams: acknowledgements may have freed buffers."""
        self._wake_progress()

    # --- events ---------------------------------------------------------------

    def _handle(self, events: list[ev.SessionEvent]) -> None:
        for event in events:
            if isinstance(event, ev.ChannelData):
                chan = self._channels.get(event.stream)
                if chan is not None:
                    chan.reader.feed_data(event.data)
                    if event.end_stream:
                        chan.reader.feed_eof()
                        del self._channels[event.stream]
            elif isinstance(event, ev.BulkReadable):
                receiver = self._receivers.get(event.transfer_id)
                if receiver is not None:
                    receiver.wake()
            elif isinstance(event, ev.BulkAcked):
                self._wake_progress()
                sender = self._senders.get(event.transfer_id)
                if sender is not None:
                    sender.wake()
                    if event.complete:
                        del self._senders[event.transfer_id]
            else:
                self._handle_rare(event)
        self.flush()

    def _handle_rare(self, event: ev.SessionEvent) -> None:
        if isinstance(event, ev.RequestReceived):
            self._tasks.spawn(self._answer(event.stream, event.body))
        elif isinstance(event, ev.ResponseReceived | ev.RequestFailed | ev.StreamReset):
            self._resolve(event)
        elif isinstance(event, ev.ChannelOpened):
            self._new_channels.append(self._channel(event.stream, event.name))
            self._wake_arrivals()
        elif isinstance(event, ev.BulkStarted):
            receiver = BulkReceiver(self, self._core.transfers.claim(event.transfer_id))
            live = self._core.transfers.incoming
            self._receivers = {t: r for t, r in self._receivers.items() if t in live}
            self._receivers[event.transfer_id] = receiver
            self._new_bulk.append(receiver)
            self._wake_arrivals()
        elif isinstance(event, ev.PeerClosed):
            self._fail(ConnectionLostError(f"the peer closed the session: {event.reason}"))
        elif isinstance(event, ev.ProtocolError):
            log.warning("node %s broke the protocol: %s", self._peer.node_id, event.error)
            self._fail(
                ConnectionLostError(f"closed: the peer sent a malformed frame: {event.error}")
            )

    def _resolve(self, event: ev.ResponseReceived | ev.RequestFailed | ev.StreamReset) -> None:
        if isinstance(event, ev.StreamReset) and event.kind is ev.StreamKind.CHANNEL:
            chan = self._channels.pop(event.stream, None)
            if chan is not None:
                chan.reader.feed_eof()
            return
        fut = self._requests.pop(event.stream, None)
        if fut is None or fut.done():
            return
        if isinstance(event, ev.ResponseReceived):
            fut.set_result(event.body)
        elif isinstance(event, ev.RequestFailed):
            fut.set_exception(
                RemoteError(event.code, f"the peer's handler failed: {event.message}")
            )
        else:
            fut.set_exception(ConnectionLostError("the peer reset the request stream"))

    def _wake_arrivals(self) -> None:
        fut, self._arrived = self._arrived, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    # --- the end ----------------------------------------------------------------

    def _fail(self, error: DwcpError) -> None:
        if self.error is not None:
            return
        self.error = error
        self._failed.set_result(None)
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
        self._requests.clear()
        self._wake_progress()
        self._wake_arrivals()
        for receiver in self._receivers.values():
            receiver.wake()
        for sender in self._senders.values():
            sender.wake()
        for chan in self._channels.values():
            chan.reader.wake()
        for conn in self.conns:
            conn.close(str(error)[:100])
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    @property
    def closed(self) -> bool:
        return self.error is not None

    def add_close_callback(self, callback: Callable[[Session], None]) -> None:
        """Call ``callback(session)`` once the session has ended (at once if it has)."""
        self._failed.add_done_callback(lambda _f: callback(self))

    async def close(self, reason: str = "session closed", *, linger: float = LINGER) -> None:
        """Flush what was written, then close every connection and stop the session's tasks.

        Closing a QUIC connection discards whatever it has not sent yet, so the
        last message written before ``close`` would often be lost. ``close`` first
        waits, at most ``linger`` seconds, until the peer's QUIC stack has
        acknowledged everything already written: channel data and end-of-stream,
        requests and responses, bulk chunks and bulk acks. After ``linger`` (for
        instance when the peer stopped reading a channel) it closes anyway;
        ``linger=0`` closes at once and drops unsent data. Later calls on this
        session raise ``SessionClosedError``. If ``close`` itself is cancelled,
        the session is closed at once and the cancellation goes on.
        """
        try:
            if self.error is None and linger > 0:
                await self._flush(linger)
        finally:
            if self.error is None:
                for conn in self.conns:
                    conn.close(reason)
                self._fail(SessionClosedError(f"the session was closed locally ({reason})"))
        current = asyncio.current_task()
        await cancel_and_wait(*[t for t in self._tasks if t is not current])

    async def _flush(self, linger: float) -> None:
        for conn in self.conns:
            conn.transmit_soon()
        with contextlib.suppress(TimeoutError, DwcpError):
            async with asyncio.timeout(linger):
                while self._core.unflushed():
                    await self.wait_progress()

    async def wait_closed(self) -> DwcpError:
        """Wait until the session ends; return the error that ended it."""
        await asyncio.wait([self._failed])
        assert self.error is not None
        return self.error

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
        await self.wait_closed()

    # --- requests -----------------------------------------------------------------

    async def _answer(self, key: ev.StreamKey, body: bytes) -> None:
        try:
            if self._on_request is None:
                raise RemoteError("no_handler", "this node does not accept requests")
            ok, reply = True, await self._on_request(self, body)
        except RemoteError as exc:
            ok, reply = False, f"{exc.code}\n{exc}".encode()
        except DwcpError as exc:
            ok, reply = False, f"{type(exc).__name__}\n{exc}".encode()
        except Exception as exc:
            log.exception("request handler failed")
            ok, reply = False, f"internal\n{type(exc).__name__}: {exc}".encode()
        except asyncio.CancelledError:
            self._core.drop_request(key)
            raise
        if self.error is not None:
            self._core.drop_request(key)
            return
        self._core.send_response(key, ok, reply)
        self.flush()

    async def request(self, body: bytes, *, timeout: float | None = None) -> bytes:
        """Send ``body`` to the peer's request handler and return its reply.

        On a timeout (``TimeoutError``) or a cancellation the session stays
        usable; a late answer is dropped.
        """
        self.check()
        key = self._core.send_request(body)
        self.flush()
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._requests[key] = fut
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if self._requests.pop(key, None) is not None:
                self._core.abandon_request(key)

    # --- channels -------------------------------------------------------------

    def _channel(self, key: ev.StreamKey, name: str) -> Channel:
        window = self.config.stream_window
        chan = Channel(
            name,
            ChannelReader(self, key, window),
            ChannelWriter(self, key, name, window),
        )
        self._channels[key] = chan
        return chan

    async def open_channel(self, name: str = "") -> Channel:
        """Open an ordered byte channel; the peer gets it from ``accept_channel``."""
        self.check()
        chan = self._channel(self._core.open_channel(name), name)
        self.flush()
        return chan

    async def accept_channel(self) -> Channel:
        """Wait for the peer to open a channel (cancelling the wait loses none)."""
        chan = await self._next(self._new_channels)
        self._core.channel_accepted()
        return chan

    async def accept_bulk(self) -> BulkReceiver:
        """Wait for the peer to start a bulk transfer (cancelling the wait loses none)."""
        return await self._next(self._new_bulk)

    async def _next(self, arrivals: collections.deque[_T]) -> _T:
        while not arrivals:
            self.check()
            if self._arrived is None:
                self._arrived = self._loop.create_future()
            waits: list[asyncio.Future[Any]] = [self._arrived, self._failed]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return arrivals.popleft()

    # --- bulk -------------------------------------------------------------------

    def open_bulk(self, offset: int = 0) -> BulkSender:
        """Start a bulk transfer whose first byte is at ``offset`` (non-zero to resume)."""
        self.check()
        sender = BulkSender(self, self._core.transfers.open(offset))
        self._senders[sender.transfer_id] = sender
        self.flush()
        self._grow(self._core.controller.connections)
        if not self._adapting:
            self._adapting = True
            self._tasks.spawn(self._adapt_loop())
        return sender

    async def send(
        self,
        buffers: Iterable[bytes | bytearray | memoryview]
        | AsyncIterable[bytes | bytearray | memoryview],
        *,
        offset: int = 0,
    ) -> int:
        """Send ``buffers`` as one bulk transfer; return once the peer consumed it all.

        Returns the end offset. On a ``TransportError`` the caller may reconnect
        and call ``send`` again with the remaining data and ``offset=`` the
        receiver's ``BulkReceiver.offset``.
        """
        sender = self.open_bulk(offset)
        if isinstance(buffers, AsyncIterable):
            async for buf in buffers:
                await sender.write(buf)
        else:
            for buf in buffers:
                await sender.write(buf)
        return await sender.finish()

    # --- adaptation -------------------------------------------------------------

    def open_initial(self) -> None:
        """Open the connections the policy starts with now (they handshake in the
        background), so a transfer that starts soon finds them up."""
        self.check()
        self._grow(self._core.controller.connections)

    async def _adapt_loop(self) -> None:
        """Every interval, let the core measure and decide; open the connections it wants."""
        core = self._core
        core.adapt(now())
        while self.error is None:
            await asyncio.sleep(self.config.interval)
            self._grow(core.adapt(now()))

    def _grow(self, connections: int) -> None:
        missing = connections - len(self.conns) - self._opening
        if missing <= 0 or self._opener is None:
            return
        for _ in range(missing):
            self._opening += 1
            self._tasks.spawn(self._open_one())

    async def _open_one(self) -> None:
        assert self._opener is not None
        try:
            conn = await self._opener(self, len(self.conns) + self._opening - 1)
        except DwcpError as exc:
            log.warning("could not open an extra connection: %s", exc)
            return
        finally:
            self._opening -= 1
        if self.error is not None:
            conn.close("session ended")
            return
        self.attach(conn)

    def snapshot(self) -> Snapshot:
        """The adaptive controller's inputs and decisions."""
        return self._core.snapshot()

    def stats(self) -> SessionStats:
        return self._core.stats()
