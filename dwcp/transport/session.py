"""A session between two nodes: requests, channels and striped bulk transfers.

One session spans one or more QUIC connections (the first is the primary; it
carries requests, channels and the bulk control frames). Each connection
starts with a client-opened control stream whose first frame is ``Hello``.
Bulk data travels in ``BulkData`` frames on unidirectional "lane" streams
spread over the connections, and is reassembled in order by ``stripe``.
If any connection of the session fails, the whole session fails with a typed
``TransportError``; callers reconnect and resume from the receiver's offset.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from dwcp import wire
from dwcp.errors import (
    ConnectionLostError,
    DwcpError,
    FrameError,
    RemoteError,
    SessionClosedError,
    UsageError,
)
from dwcp.identity import PublicKey
from dwcp.pba.parallelism import Controller, Limits, LinkSample, Snapshot
from dwcp.transport.aio import Conn, now
from dwcp.transport.bulk import BulkReceiver, BulkSender
from dwcp.transport.channel import Channel, ChannelReader, ChannelWriter
from dwcp.transport.config import TransportConfig

if TYPE_CHECKING:
    from dwcp.transport.api import ConnOpener

log = logging.getLogger("dwcp.transport")

_T = TypeVar("_T")
RequestHandler = Callable[["Session", bytes], Awaitable[bytes]]
CONTROL_STREAM = 0  # the client's first bidirectional stream on every connection
# Caps on what a peer can make this node hold (each also bounded in bytes by its window).
MAX_CONCURRENT_REQUESTS = 256
MAX_PENDING = 64
TIMELINE_POINTS = 4096
# Seconds ``close`` waits by default for written data to be acknowledged.
LINGER = 5.0


class _Stream:
    """Per-stream receive state: a decoder until the stream's kind is known."""

    __slots__ = ("decoder", "kind", "target")

    def __init__(self) -> None:
        self.decoder: wire.FrameDecoder | None = wire.FrameDecoder()
        self.kind = ""
        self.target: object = None


@dataclass
class TimelinePoint:
    t: float
    connections: int
    streams: int
    goodput_bps: float
    rtt_ms: float
    loss: float


@dataclass
class SessionStats:
    """Counters for ``dwcp perf`` and metrics."""

    connections: int
    streams: int
    rtt_ms: float
    loss: float
    packets_sent: int
    packets_lost: int
    bulk_bytes_acked: int
    timeline: list[TimelinePoint] = field(default_factory=list)


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
        self.peer = peer
        self.is_client = is_client
        self.config = config
        self._on_request = on_request
        self._opener = opener
        self._loop = asyncio.get_running_loop()
        self.conns: list[Conn] = []
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._pending: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self._channels: asyncio.Queue[Channel] = asyncio.Queue()
        self._incoming_bulk: asyncio.Queue[BulkReceiver] = asyncio.Queue()
        self._receivers: dict[int, BulkReceiver] = {}
        self._senders: dict[int, BulkSender] = {}
        self._transfer_ids = itertools.count(1 if is_client else 2, 2)
        self._lanes: list[tuple[Conn, int]] = []
        self._out_lanes: dict[tuple[int, int], int] = {}
        # The sender may have at most this many unconsumed bytes at the receiver.
        self.send_window = min(config.bulk_window, peer_window or config.bulk_window)
        self._progress: asyncio.Future[None] | None = None
        self._failed: asyncio.Future[None] = self._loop.create_future()
        self.error: DwcpError | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.controller = Controller(
            config.policy,
            limits=Limits(
                max_connections=config.max_connections if is_client else 1,
                max_streams=config.max_streams,
            ),
            initial=(config.initial_connections, config.initial_streams),
        )
        # Bounded: a long-lived session keeps the last TIMELINE_POINTS intervals.
        self.timeline: collections.deque[TimelinePoint] = collections.deque(maxlen=TIMELINE_POINTS)
        self._adapt_task: asyncio.Task[None] | None = None
        self._opening = 0
        self._t0 = now()
        self.attach(primary)

    # --- connections ------------------------------------------------------------

    def attach(self, conn: Conn) -> None:
        """Add a connection (the primary first) that has said Hello for this session."""
        conn.index = len(self.conns)
        conn.listener = self
        conn.quic.app_has_more = self._writing
        self.conns.append(conn)

    def _writing(self) -> bool:
        return any(s.writing for s in self._senders.values())

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def terminated(self, conn: Conn, error: DwcpError) -> None:
        self._fail(error)

    def _fail(self, error: DwcpError) -> None:
        if self.error is not None:
            return
        self.error = error
        self._failed.set_result(None)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
        self._pending.clear()
        self._wake_progress()
        for recv in self._receivers.values():
            recv._wake()
        for st in self._streams.values():
            if isinstance(st.target, Channel):
                st.target.reader._wake()
        for conn in self.conns:
            conn.close(str(error)[:100])
        for task in list(self._tasks):
            task.cancel()
        if self._adapt_task is not None:
            self._adapt_task.cancel()

    @property
    def closed(self) -> bool:
        return self.error is not None

    async def close(self, reason: str = "session closed", *, linger: float = LINGER) -> None:
        """Flush what was written, then close every connection.

        Closing a QUIC connection discards whatever it has not sent yet, so the
        last message written before ``close`` would often be lost. ``close`` first
        waits, at most ``linger`` seconds, until the peer's QUIC stack has
        acknowledged everything already written: channel data and end-of-stream,
        requests and responses, bulk chunks and bulk acks. After ``linger`` (for
        instance when the peer stopped reading a channel) it closes anyway;
        ``linger=0`` closes at once and drops unsent data. Later calls on this
        session raise ``SessionClosedError``.
        """
        if self.error is None and linger > 0:
            await self._flush(linger)
        if self.error is None:
            for conn in self.conns:
                conn.close(reason)
            self._fail(SessionClosedError(f"the session was closed locally ({reason})"))
        await asyncio.sleep(0)

    def _unflushed(self) -> bool:
        """True while some connection holds written data the peer has not acknowledged."""
        return any(not conn.closed and conn.quic.unflushed() for conn in self.conns)

    async def _flush(self, linger: float) -> None:
        for conn in self.conns:
            conn.transmit_soon()
        with contextlib.suppress(TimeoutError, DwcpError):
            async with asyncio.timeout(linger):
                while self._unflushed():
                    await self._wait_progress()

    async def wait_closed(self) -> DwcpError:
        """Wait until the session ends; return the error that ended it."""
        await asyncio.shield(self._failed)
        assert self.error is not None
        return self.error

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- progress (send-side back-pressure) ----------------------------------

    def progress(self, conn: Conn) -> None:
        """Called after each batch of datagrams: acknowledgements may have freed buffers."""
        self._wake_progress()

    def _wake_progress(self) -> None:
        fut = self._progress
        if fut is not None:
            self._progress = None
            if not fut.done():
                fut.set_result(None)

    async def _wait_progress(self) -> None:
        self._check()
        if self._progress is None:
            self._progress = self._loop.create_future()
        await asyncio.wait([self._progress, self._failed], return_when=asyncio.FIRST_COMPLETED)
        self._check()

    # --- frames in ------------------------------------------------------------

    def stream_reset(self, conn: Conn, stream_id: int) -> None:
        st = self._streams.pop((conn.index, stream_id), None)
        if st is not None and isinstance(st.target, Channel):
            st.target.reader._feed(b"", True)
        fut = self._pending.pop((conn.index, stream_id), None)
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionLostError("the peer reset the request stream"))

    def stream_data(self, conn: Conn, stream_id: int, data: bytes, fin: bool) -> None:
        key = (conn.index, stream_id)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        if st.kind == "channel":
            assert isinstance(st.target, Channel)
            st.target.reader._feed(data, fin)
            return
        decoder = st.decoder
        assert decoder is not None
        try:
            if not st.kind:
                # The first frame decides what the stream is.
                first = decoder.feed(data, limit=1)
                if not first:
                    return
                self._on_frame(conn, stream_id, st, first[0])
                if isinstance(st.target, Channel):
                    rest = decoder.detach()
                    st.decoder = None
                    assert isinstance(st.target, Channel)
                    st.target.reader._feed(rest, fin)
                    return
                data = b""
            for frame in decoder.feed(data):
                self._on_frame(conn, stream_id, st, frame)
        except (FrameError, UsageError) as exc:
            log.warning("node %s broke the protocol: %s", self.peer.node_id, exc)
            self._fail(ConnectionLostError(f"closed: the peer sent a malformed frame: {exc}"))
            return
        if fin:
            self._streams.pop(key, None)

    def adopt_control(self, conn: Conn, decoder: wire.FrameDecoder) -> None:
        """Take over a connection's control stream after the server has read its Hello."""
        st = self._streams[(conn.index, CONTROL_STREAM)] = _Stream()
        st.kind = "control"
        st.decoder = decoder
        self.stream_data(conn, CONTROL_STREAM, b"", False)

    def _on_frame(self, conn: Conn, sid: int, st: _Stream, frame: wire.Frame) -> None:
        if isinstance(frame, wire.BulkData):
            st.kind = "lane"
            recv = self._receiver(frame.transfer_id)
            recv.reasm.add(frame.offset, frame.data)
            recv._deliver()
        elif st.kind == "control" or (sid == CONTROL_STREAM and not st.kind):
            st.kind = "control"
            self._on_control(frame)
        elif isinstance(frame, wire.Request) and not st.kind:
            st.kind = "request"
            if len(self._tasks) >= MAX_CONCURRENT_REQUESTS:
                raise FrameError(
                    f"the peer has more than {MAX_CONCURRENT_REQUESTS} requests in progress"
                )
            self._spawn(self._answer(conn, sid, frame.body))
        elif isinstance(frame, wire.Response) and st.kind == "awaiting":
            st.kind = "done"
            fut = self._pending.pop((conn.index, sid), None)
            if fut is not None and not fut.done():
                if frame.ok:
                    fut.set_result(frame.body)
                else:
                    code, _, msg = frame.body.decode(errors="replace").partition("\n")
                    fut.set_exception(RemoteError(code, f"the peer's handler failed: {msg}"))
        elif isinstance(frame, wire.ChannelOpen) and not st.kind:
            st.kind = "channel"
            conn.quic.pace_stream(sid, self.config.stream_window)
            chan = self._make_channel(conn, sid, frame.name)
            st.target = chan
            if self._channels.qsize() >= MAX_PENDING:
                raise FrameError(f"the peer opened more than {MAX_PENDING} unaccepted channels")
            self._channels.put_nowait(chan)
        else:
            raise FrameError(f"unexpected {type(frame).__name__} frame on stream {sid}")

    def _on_control(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.BulkStart):
            recv = self._receiver(frame.transfer_id)
            recv.reasm.set_start(frame.offset)
            recv._deliver()
            self._incoming_bulk.put_nowait(recv)
        elif isinstance(frame, wire.BulkEnd):
            recv = self._receiver(frame.transfer_id)
            recv.reasm.set_end(frame.end)
            recv._deliver()
        elif isinstance(frame, wire.BulkAck):
            sender = self._senders.get(frame.transfer_id)
            if sender is not None:
                sender._on_ack(frame.offset)
                if sender._done.done():
                    self._senders.pop(frame.transfer_id, None)
        elif isinstance(frame, wire.Close):
            self._fail(ConnectionLostError(f"the peer closed the session: {frame.reason}"))
        elif isinstance(frame, wire.Hello):
            raise FrameError("Hello sent twice on a connection")
        else:
            raise FrameError(f"unexpected {type(frame).__name__} frame on the control stream")

    def _receiver(self, transfer_id: int) -> BulkReceiver:
        recv = self._receivers.get(transfer_id)
        if recv is None:
            if len(self._receivers) >= MAX_PENDING:
                raise FrameError(
                    f"the peer opened more than {MAX_PENDING} concurrent bulk transfers"
                )
            recv = self._receivers[transfer_id] = BulkReceiver(
                self, transfer_id, self.config.bulk_window
            )
        return recv

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, conn: Conn, sid: int, body: bytes) -> None:
        try:
            if self._on_request is None:
                raise RemoteError("no_handler", "this node does not accept requests")
            reply = wire.Response(True, await self._on_request(self, body))
        except RemoteError as exc:
            reply = wire.Response(False, f"{exc.code}\n{exc}".encode())
        except DwcpError as exc:
            if self.error is not None:
                return
            reply = wire.Response(False, f"{type(exc).__name__}\n{exc}".encode())
        except Exception as exc:
            log.exception("request handler failed")
            reply = wire.Response(False, f"internal\n{type(exc).__name__}: {exc}".encode())
        if self.error is None and not conn.closed:
            conn.quic.send_stream_data(sid, wire.encode(reply), end_stream=True)
            conn.transmit_soon()

    # --- frames out -------------------------------------------------------------

    def _send_control(self, frame: wire.Frame) -> None:
        if self.error is not None:
            return
        conn = self.conns[0]
        conn.quic.send_stream_data(CONTROL_STREAM, wire.encode(frame))
        conn.transmit_soon()

    async def request(self, body: bytes, *, timeout: float | None = None) -> bytes:
        """Send ``body`` to the peer's request handler and return its reply."""
        self._check()
        conn = self.conns[0]
        sid = conn.quic.get_next_available_stream_id()
        st = self._streams[(conn.index, sid)] = _Stream()
        st.kind = "awaiting"
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._pending[(conn.index, sid)] = fut
        conn.quic.send_stream_data(sid, wire.encode(wire.Request(bytes(body))), end_stream=True)
        conn.transmit_soon()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            self._pending.pop((conn.index, sid), None)
            self._streams.pop((conn.index, sid), None)

    def _make_channel(self, conn: Conn, sid: int, name: str) -> Channel:
        return Channel(
            name,
            ChannelReader(self, conn, sid),
            ChannelWriter(self, conn, sid, self.config.stream_window),
        )

    async def open_channel(self, name: str = "") -> Channel:
        """Open an ordered byte channel; the peer gets it from ``accept_channel``."""
        self._check()
        conn = self.conns[0]
        sid = conn.quic.get_next_available_stream_id()
        conn.quic.pace_stream(sid, self.config.stream_window)
        st = self._streams[(conn.index, sid)] = _Stream()
        st.kind = "channel"
        st.decoder = None
        chan = st.target = self._make_channel(conn, sid, name)
        conn.quic.send_stream_data(sid, wire.encode(wire.ChannelOpen(name)))
        conn.transmit_soon()
        return chan

    async def accept_channel(self) -> Channel:
        """Wait for the peer to open a channel."""
        return await self._next(self._channels)

    async def accept_bulk(self) -> BulkReceiver:
        """Wait for the peer to start a bulk transfer."""
        return await self._next(self._incoming_bulk)

    async def _next(self, queue: asyncio.Queue[_T]) -> _T:
        self._check()
        getter = asyncio.ensure_future(queue.get())
        both: list[asyncio.Future[Any]] = [getter, self._failed]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        self._check()
        raise SessionClosedError("the session ended")

    # --- bulk -------------------------------------------------------------------

    def open_bulk(self, offset: int = 0) -> BulkSender:
        """Start a bulk transfer whose first byte is at ``offset`` (non-zero to resume)."""
        self._check()
        tid = next(self._transfer_ids)
        sender = self._senders[tid] = BulkSender(self, tid, offset, self.send_window)
        self._send_control(wire.BulkStart(tid, offset))
        self._grow(self.controller.connections)
        if self._adapt_task is None:
            self._adapt_task = asyncio.ensure_future(self._adapt_loop())
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

    def _active_lanes(self) -> list[tuple[Conn, int]]:
        """The lanes the controller's decision asks for, opening streams as needed."""
        ctl = self.controller
        conns = [c for c in self.conns[: ctl.connections] if not c.closed]
        return [self._lane(c, i) for c in conns for i in range(ctl.streams)]

    def _lane(self, conn: Conn, i: int) -> tuple[Conn, int]:
        sid = self._out_lanes.get((conn.index, i))
        if sid is None:
            sid = conn.quic.get_next_available_stream_id(is_unidirectional=True)
            conn.quic.reserve_stream(sid)
            self._out_lanes[(conn.index, i)] = sid
        return conn, sid

    async def _pick_lane(self) -> tuple[Conn, int]:
        """The lane whose connection will send a new chunk soonest (waits if all are full).

        Each connection may have about one congestion window of data waiting to be
        sent; the chunk goes to the connection with the least waiting data relative to
        its window, on its least-loaded stream. Striping in proportion to each
        connection's speed keeps the receiver's reassembly gaps near one RTT of data;
        equal shares would let a slow connection hold the whole window hostage.
        """
        floor = 2 * self.config.chunk
        while True:
            lanes = self._lanes
            if not lanes:
                lanes = self._lanes = self._active_lanes()
            best: tuple[Conn, int] | None = None
            best_score = 0.0
            by_conn: dict[int, list[int]] = {}
            conns: dict[int, Conn] = {}
            for conn, sid in lanes:
                if not conn.closed:
                    by_conn.setdefault(conn.index, []).append(sid)
                    conns[conn.index] = conn
            for index, sids in by_conn.items():
                quic = conns[index].quic
                waiting = [quic.send_unsent(sid) for sid in sids]
                allowed = max(quic.congestion_window, floor)
                total = sum(waiting)
                if total >= allowed:
                    continue
                score = total / allowed
                if best is None or score < best_score:
                    best = (conns[index], sids[waiting.index(min(waiting))])
                    best_score = score
            if best is not None:
                return best
            await self._wait_progress()

    # --- adaptation -------------------------------------------------------------

    def _lane_acked(self) -> int:
        """Bulk bytes (with frame headers) the peer's QUIC stack has acknowledged."""
        return sum(self.conns[ci].quic.send_acked(sid) for (ci, _i), sid in self._out_lanes.items())

    def _link(self) -> tuple[float, int, int]:
        conns = [c for c in self.conns if not c.closed]
        rtts = [c.quic.smoothed_rtt for c in conns if c.quic.smoothed_rtt > 0]
        rtt = sum(rtts) / len(rtts) if rtts else 0.0
        sent = sum(c.quic.counters.packets_sent for c in self.conns)
        lost = sum(c.quic.counters.packets_lost for c in self.conns)
        return rtt, sent, lost

    async def _adapt_loop(self) -> None:
        """Every interval: measure, ask the controller, apply its decision."""
        interval = self.config.interval
        last_t, last_acked = now(), self._lane_acked()
        _, last_sent, last_lost = self._link()
        while self.error is None:
            await asyncio.sleep(interval)
            t = now()
            acked = self._lane_acked()
            rtt, sent, lost = self._link()
            dt = max(t - last_t, 1e-6)
            goodput = (acked - last_acked) * 8 / dt
            dsent = sent - last_sent
            loss = (lost - last_lost) / dsent if dsent > 0 else 0.0
            last_t, last_acked, last_sent, last_lost = t, acked, sent, lost
            ctl = self.controller
            if not self._senders and not goodput:
                continue  # idle: nothing to record or learn from
            self.timeline.append(
                TimelinePoint(
                    round(t - self._t0, 3),
                    len([c for c in self.conns[: ctl.connections] if not c.closed]),
                    ctl.streams,
                    goodput,
                    rtt * 1000,
                    loss,
                )
            )
            if not self._senders:
                continue  # idle: nothing to learn from
            sample = LinkSample(
                now=t,
                interval=dt,
                goodput_bps=goodput,
                rtt_s=rtt,
                loss=loss,
                connections=ctl.connections,
                streams=ctl.streams,
            )
            before = (ctl.connections, ctl.streams)
            decision = ctl.feed(sample)
            if (decision.connections, decision.streams) != before:
                log.debug("adapt: %s", decision)
            self._grow(decision.connections)
            self._lanes = []  # rebuild from the decision at the next pick

    def _grow(self, connections: int) -> None:
        missing = connections - len(self.conns) - self._opening
        if missing <= 0 or self._opener is None:
            return
        for _ in range(missing):
            self._opening += 1
            self._spawn(self._open_one())

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
        self._lanes = []

    def snapshot(self) -> Snapshot:
        """The adaptive controller's inputs and decisions."""
        return self.controller.snapshot()

    def stats(self) -> SessionStats:
        rtt, sent, lost = self._link()
        return SessionStats(
            connections=len([c for c in self.conns if not c.closed]),
            streams=self.controller.streams,
            rtt_ms=rtt * 1000,
            loss=lost / sent if sent else 0.0,
            packets_sent=sent,
            packets_lost=lost,
            bulk_bytes_acked=self._lane_acked(),
            timeline=list(self.timeline),
        )
