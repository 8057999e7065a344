"""The sans-IO session protocol: stream demux, requests, channels, bulk control, adaptation.

A session spans one or more QUIC connections (``add_connection``; the first
is the primary, which carries requests, channels and the bulk control frames).
Each connection starts with a client-opened control stream whose first frame
is ``Hello`` (exchanged by ``api`` before the connection joins the core). The
first frame of any other stream says what it is (``StreamKind``): a
``Request``, a ``ChannelOpen`` (raw bytes follow) or ``BulkData`` (a lane).

``SessionCore`` sits on the QUIC connections as aioquic's h3 layer does:
``receive(conn, stream, data, fin) -> list[SessionEvent]``; the API calls
(``send_request``, ``open_channel``, ``transfers.send``...) write to the QUIC
streams and record which connections have output (``take_touched``). It holds
no sockets, clocks or tasks: ``adapt(now)`` takes the time. A peer that breaks
the protocol or exceeds a limit (``PeerLimits``) gets one ``ProtocolError``
and every later input is ignored.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from dwcp import wire
from dwcp.errors import FrameError, UsageError
from dwcp.pba.parallelism import Controller, Limits, LinkSample, Snapshot
from dwcp.transport.config import TransportConfig
from dwcp.transport.events import (
    ChannelData,
    ChannelOpened,
    PeerClosed,
    ProtocolError,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
    SessionEvent,
    StreamKey,
    StreamKind,
    StreamReset,
)
from dwcp.transport.layer import StreamLayer
from dwcp.transport.transfers import Transfers

CONTROL_STREAM = 0  # the client's first bidirectional stream on every connection
TIMELINE_POINTS = 4096


@dataclass(frozen=True)
class PeerLimits:
    """What a peer can make this node hold (each also bounded in bytes by its window)."""

    requests: int = 256  # requests in progress at this node
    unaccepted_channels: int = 64  # channels opened and not yet accepted
    transfers: int = 64  # concurrent incoming bulk transfers


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


class _Stream:
    """Per-stream receive state: a decoder until the stream turns raw (a channel)."""

    __slots__ = ("decoder", "kind")

    def __init__(self, kind: StreamKind = StreamKind.UNKNOWN) -> None:
        self.decoder: wire.FrameDecoder | None = wire.FrameDecoder()
        self.kind = kind


class SessionCore:
    """One session's protocol state over its QUIC connections (see the module docstring)."""

    def __init__(
        self,
        config: TransportConfig,
        *,
        is_client: bool,
        peer_window: int | None = None,
        limits: PeerLimits | None = None,
    ) -> None:
        self.config = config
        self.is_client = is_client
        self.limits = limits or PeerLimits()
        self.conns: list[StreamLayer] = []
        self.failed: FrameError | None = None
        self._streams: dict[StreamKey, _Stream] = {}
        self._answering = 0
        self._unaccepted = 0
        self._touched: set[int] = set()
        self.transfers = Transfers(
            self.conns,
            is_client=is_client,
            recv_window=config.bulk_window,
            # The sender may have at most this many unconsumed bytes at the receiver.
            send_window=min(config.bulk_window, peer_window or config.bulk_window),
            chunk=config.chunk,
            max_incoming=self.limits.transfers,
            send_control=self._send_control,
            touched=self._touched.add,
        )
        self.controller = Controller(
            config.policy,
            limits=Limits(
                max_connections=config.max_connections if is_client else 1,
                max_streams=config.max_streams,
            ),
            initial=(config.initial_connections, config.initial_streams),
        )
        self.transfers.set_shape(self.controller.connections, self.controller.streams)
        # Bounded: a long-lived session keeps the last TIMELINE_POINTS intervals.
        self.timeline: collections.deque[TimelinePoint] = collections.deque(maxlen=TIMELINE_POINTS)
        self._last: tuple[float, int, int, int] | None = None  # t, acked, sent, lost
        self._t0: float | None = None

    # --- connections and output -----------------------------------------------

    def add_connection(self, quic: StreamLayer) -> int:
        """Add a connection that said Hello for this session; return its index."""
        self.conns.append(quic)
        self.transfers.set_shape(self.controller.connections, self.controller.streams)
        return len(self.conns) - 1

    def take_touched(self) -> list[int]:
        """Indices of the connections written to since the last call (to transmit)."""
        touched = sorted(self._touched)
        self._touched.clear()
        return touched

    def unflushed(self) -> bool:
        """True while some connection holds written data the peer has not acknowledged."""
        return any(quic.unflushed() for quic in self.conns)

    def _write(self, key: StreamKey, data: bytes, end_stream: bool = False) -> None:
        self.conns[key.conn].send_stream_data(key.stream, data, end_stream)
        self._touched.add(key.conn)

    def _send_control(self, frame: wire.Frame) -> None:
        self._write(StreamKey(0, CONTROL_STREAM), wire.encode(frame))

    def _new_stream(self, kind: StreamKind) -> StreamKey:
        quic = self.conns[0]
        key = StreamKey(0, quic.get_next_available_stream_id())
        self._streams[key] = _Stream(kind)
        return key

    # --- frames in ------------------------------------------------------------

    def adopt_control(self, conn: int, decoder: wire.FrameDecoder) -> list[SessionEvent]:
        """Take over a connection's control stream, with what followed its Hello."""
        st = self._streams[StreamKey(conn, CONTROL_STREAM)] = _Stream(StreamKind.CONTROL)
        st.decoder = decoder
        return self.receive(conn, CONTROL_STREAM, b"", False)

    def receive(self, conn: int, stream_id: int, data: bytes, fin: bool) -> list[SessionEvent]:
        """Data of a QUIC stream -> what happened in the session."""
        if self.failed is not None:
            return []
        key = StreamKey(conn, stream_id)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        events: list[SessionEvent] = []
        try:
            self._receive(key, st, data, fin, events)
        except (FrameError, UsageError) as exc:
            err = exc if isinstance(exc, FrameError) else FrameError(str(exc))
            self.failed = err
            events.append(ProtocolError(err))
            return events
        if fin:
            self._streams.pop(key, None)
        return events

    def _receive(
        self, key: StreamKey, st: _Stream, data: bytes, fin: bool, events: list[SessionEvent]
    ) -> None:
        if st.kind is StreamKind.CHANNEL:
            events.append(ChannelData(key, data, fin))
            return
        if st.kind is StreamKind.DONE:
            return
        decoder = st.decoder
        assert decoder is not None
        if st.kind is StreamKind.UNKNOWN:
            # The first frame decides what the stream is.
            first = decoder.feed(data, limit=1)
            if not first:
                return
            if self._on_frame(key, st, first[0], events) is StreamKind.CHANNEL:
                rest = decoder.detach()
                st.decoder = None
                if rest or fin:
                    events.append(ChannelData(key, rest, fin))
                return
            data = b""
        for frame in decoder.feed(data):
            self._on_frame(key, st, frame, events)

    def reset(self, conn: int, stream_id: int) -> list[SessionEvent]:
        """The peer reset a stream (``RESET_STREAM``)."""
        st = self._streams.pop(StreamKey(conn, stream_id), None)
        if self.failed is not None or st is None:
            return []
        if st.kind in (StreamKind.CHANNEL, StreamKind.AWAITING):
            return [StreamReset(StreamKey(conn, stream_id), st.kind)]
        if st.kind is StreamKind.REQUEST:
            st.kind = StreamKind.DONE  # the answer is still counted until it is sent
        return []

    def _on_frame(
        self, key: StreamKey, st: _Stream, frame: wire.Frame, events: list[SessionEvent]
    ) -> StreamKind:
        """Act on one frame of stream ``key``; return the stream's kind after it."""
        kind = st.kind
        if isinstance(frame, wire.BulkData):
            if kind not in (StreamKind.UNKNOWN, StreamKind.LANE) or key.stream == CONTROL_STREAM:
                raise FrameError(f"BulkData on a {kind.value} stream")
            st.kind = StreamKind.LANE
            events += self.transfers.on_data(frame)
        elif kind is StreamKind.CONTROL or (
            key.stream == CONTROL_STREAM and kind is StreamKind.UNKNOWN
        ):
            st.kind = StreamKind.CONTROL
            events += self._on_control(frame)
        elif isinstance(frame, wire.Request) and kind is StreamKind.UNKNOWN:
            if self._answering >= self.limits.requests:
                raise FrameError(
                    f"the peer has more than {self.limits.requests} requests in progress"
                )
            st.kind = StreamKind.REQUEST
            self._answering += 1
            events.append(RequestReceived(key, frame.body))
        elif isinstance(frame, wire.Response) and kind is StreamKind.AWAITING:
            st.kind = StreamKind.DONE
            if frame.ok:
                events.append(ResponseReceived(key, frame.body))
            else:
                code, _, msg = frame.body.decode(errors="replace").partition("\n")
                events.append(RequestFailed(key, code, msg))
        elif isinstance(frame, wire.ChannelOpen) and kind is StreamKind.UNKNOWN:
            if self._unaccepted >= self.limits.unaccepted_channels:
                raise FrameError(
                    f"the peer opened more than {self.limits.unaccepted_channels} "
                    "unaccepted channels"
                )
            st.kind = StreamKind.CHANNEL
            self._unaccepted += 1
            self.conns[key.conn].pace_stream(key.stream, self.config.stream_window)
            events.append(ChannelOpened(key, frame.name))
        else:
            raise FrameError(f"unexpected {type(frame).__name__} frame on stream {key.stream}")
        return st.kind

    def _on_control(self, frame: wire.Frame) -> list[SessionEvent]:
        if isinstance(frame, wire.BulkStart):
            return self.transfers.on_start(frame)
        if isinstance(frame, wire.BulkEnd):
            return self.transfers.on_end(frame)
        if isinstance(frame, wire.BulkAck):
            return self.transfers.on_ack(frame)
        if isinstance(frame, wire.Close):
            return [PeerClosed(frame.reason)]
        if isinstance(frame, wire.Hello):
            raise FrameError("Hello sent twice on a connection")
        raise FrameError(f"unexpected {type(frame).__name__} frame on the control stream")

    # --- requests -------------------------------------------------------------

    def send_request(self, body: bytes) -> StreamKey:
        """Send ``body`` on a new stream; the answer comes as an event on that stream."""
        key = self._new_stream(StreamKind.AWAITING)
        self._write(key, wire.encode(wire.Request(bytes(body))), end_stream=True)
        return key

    def abandon_request(self, key: StreamKey) -> None:
        """The application stopped waiting: a late answer is dropped, not a protocol error."""
        st = self._streams.get(key)
        if st is not None:
            st.kind = StreamKind.DONE
            st.decoder = None

    def send_response(self, key: StreamKey, ok: bool, body: bytes) -> None:
        """Answer the peer's request on ``key`` (``ok`` False: ``body`` is "code\\nmessage")."""
        self._answering -= 1
        if self.failed is None:
            self._write(key, wire.encode(wire.Response(ok, body)), end_stream=True)

    def drop_request(self, key: StreamKey) -> None:
        """Give up answering the request on ``key`` (the session is ending)."""
        self._answering -= 1

    # --- channels -------------------------------------------------------------

    def open_channel(self, name: str) -> StreamKey:
        """Open a channel; write its bytes with ``channel_write``."""
        key = self._new_stream(StreamKind.CHANNEL)
        self._streams[key].decoder = None
        self.conns[0].pace_stream(key.stream, self.config.stream_window)
        self._write(key, wire.encode(wire.ChannelOpen(name)))
        return key

    def channel_accepted(self) -> None:
        """The application took one of the peer's channels (it no longer counts as pending)."""
        self._unaccepted -= 1

    def channel_write(self, key: StreamKey, data: bytes, end_stream: bool = False) -> None:
        self._write(key, data, end_stream)

    def channel_consumed(self, key: StreamKey, nbytes: int) -> None:
        """The application read ``nbytes`` of the channel: the peer may get more credit."""
        if self.conns[key.conn].consume(key.stream, nbytes):
            self._touched.add(key.conn)

    def channel_unacked(self, key: StreamKey) -> int:
        """Bytes written to the channel that the peer has not acknowledged yet."""
        return self.conns[key.conn].send_buffered(key.stream)

    # --- adaptation -------------------------------------------------------------

    def _link(self) -> tuple[float, int, int]:
        rtts = [q.smoothed_rtt for q in self.conns if q.smoothed_rtt > 0]
        rtt = sum(rtts) / len(rtts) if rtts else 0.0
        sent = sum(q.counters.packets_sent for q in self.conns)
        lost = sum(q.counters.packets_lost for q in self.conns)
        return rtt, sent, lost

    def adapt(self, now: float) -> int:
        """Measure the last interval, feed the controller; return the connections it wants.

        Call every ``config.interval`` seconds while bulk transfers may run; the
        first call only starts the measurement.
        """
        acked = self.transfers.lane_acked()
        rtt, sent, lost = self._link()
        ctl = self.controller
        last, self._last = self._last, (now, acked, sent, lost)
        if last is None:
            self._t0 = now if self._t0 is None else self._t0
            return ctl.connections
        dt = max(now - last[0], 1e-6)
        goodput = (acked - last[1]) * 8 / dt
        dsent = sent - last[2]
        loss = (lost - last[3]) / dsent if dsent > 0 else 0.0
        busy = bool(self.transfers.outgoing)
        if not busy and not goodput:
            return ctl.connections  # idle: nothing to record or learn from
        t0 = self._t0 if self._t0 is not None else now
        live = min(ctl.connections, len(self.conns))
        self.timeline.append(
            TimelinePoint(round(now - t0, 3), live, ctl.streams, goodput, rtt * 1000, loss)
        )
        if busy:
            sample = LinkSample(
                now=now,
                interval=dt,
                goodput_bps=goodput,
                rtt_s=rtt,
                loss=loss,
                connections=ctl.connections,
                streams=ctl.streams,
            )
            decision = ctl.feed(sample)
            self.transfers.set_shape(decision.connections, decision.streams)
        return ctl.connections

    def snapshot(self) -> Snapshot:
        """The adaptive controller's inputs and decisions."""
        return self.controller.snapshot()

    def stats(self) -> SessionStats:
        rtt, sent, lost = self._link()
        return SessionStats(
            connections=len(self.conns),
            streams=self.controller.streams,
            rtt_ms=rtt * 1000,
            loss=lost / sent if sent else 0.0,
            packets_sent=sent,
            packets_lost=lost,
            bulk_bytes_acked=self.transfers.lane_acked(),
            timeline=list(self.timeline),
        )
