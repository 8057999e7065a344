"""aioquic's QuicConnection with the three things dwcp needs from it and aioquic lacks.

- Trust: the TLS context is hooked (``tls.install_trust_check``) as soon as
  aioquic creates it, so the peer key is checked inside the handshake.
- Receive-side back-pressure: for "paced" streams (channels), MAX_STREAM_DATA
  credit is granted only as the application consumes (aioquic doubles the
  window whenever data arrives, so memory would follow the producer's speed).
- Link statistics: packets sent and lost, smoothed RTT, congestion window, for
  the adaptive controller.

Still sans-IO: the asyncio glue in ``aio.py`` feeds it datagrams and ``now``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicSentPacket
from aioquic.quic.recovery import K_MICRO_SECOND, K_SECOND, QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream

from dwcp.identity import PublicKey
from dwcp.transport import bbr
from dwcp.transport.tls import install_trust_check

CONGESTION_CONTROLLERS = ("reno", "cubic", bbr.NAME)


@dataclass
class LinkCounters:
    """Cumulative per-connection counters (read and differenced by the controller)."""

    packets_sent: int = 0
    packets_lost: int = 0


PACER_BURST_PACKETS = 64


class BurstPacer(QuicPacketPacer):
    """aioquic's token-bucket pacer with a deeper bucket (64 packets instead of 16).

    Why: the bucket is refilled only when the event loop wakes the connection;
    with 16 packets per wake-up and wake-ups every 2-5 ms (uvloop's 1 ms timer
    granularity plus a busy machine), one connection cannot exceed 40-90 Mbit/s
    whatever its window. 64 packets keep bursts below a quarter of the window.

    A rate-based controller (``bbr``) sets the rate itself through
    ``rate_source``; aioquic's own rule (window / smoothed RTT) would let a
    window that is only a cap on what is in flight fill the bottleneck queue.
    """

    rate_source: Callable[[], float] | None = None

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        mss = self._max_datagram_size
        rate = self.rate_source() if self.rate_source is not None else 0.0
        pacing_rate = rate if rate > 0 else congestion_window / max(smoothed_rtt, K_MICRO_SECOND)
        self.packet_time = max(K_MICRO_SECOND, min(mss / pacing_rate, K_SECOND))
        burst = max(2 * mss, min(congestion_window // 4, PACER_BURST_PACKETS * mss))
        self.bucket_max = burst / pacing_rate
        if self.bucket_time > self.bucket_max:
            self.bucket_time = self.bucket_max


class PacedStream:
    """Receive credit of one stream: the peer may send up to ``consumed + window``."""

    __slots__ = ("consumed", "window")

    def __init__(self, window: int) -> None:
        self.consumed = 0
        self.window = window


class DwcpQuicConnection(QuicConnection):
    """QuicConnection with in-handshake trust checks, paced streams and loss counters."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        trusted: Iterable[PublicKey],
        **kwargs: Any,
    ) -> None:
        super().__init__(configuration=configuration, **kwargs)
        pacer = self._loss._pacer = BurstPacer(max_datagram_size=self._max_datagram_size)
        if isinstance(self._loss._cc, bbr.BbrCongestionControl):
            cc_bbr = self._loss._cc
            pacer.rate_source = lambda: cc_bbr.pacing_rate
        self.trusted = frozenset(trusted)
        self.peer_key: PublicKey | None = None
        self.counters = LinkCounters()
        self.paced: dict[int, PacedStream] = {}
        self.app_has_more: Callable[[], bool] = lambda: False
        """Set by the session: True while a bulk writer still has data to hand over."""
        cc = self._loss._cc
        lost_hook: Callable[..., None] = cc.on_packets_lost
        sent_hook: Callable[..., None] = cc.on_packet_sent
        counters = self.counters

        def on_packets_lost(*, now: float, packets: Iterable[QuicSentPacket]) -> None:
            packets = list(packets)
            counters.packets_lost += len(packets)
            lost_hook(now=now, packets=packets)

        def on_packet_sent(*, packet: QuicSentPacket) -> None:
            counters.packets_sent += 1
            sent_hook(packet=packet)

        cc.on_packets_lost = on_packets_lost  # type: ignore[method-assign]
        cc.on_packet_sent = on_packet_sent  # type: ignore[method-assign]
        self._bbr = cc if isinstance(cc, bbr.BbrCongestionControl) else None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        out = super().datagrams_to_send(now)
        # App-limited (see bbr's docstring) only if the application has nothing more:
        # lanes are kept short on purpose, so a bulk sender's buffers run empty between
        # chunks many times per round trip while its writer waits for room.
        if (
            self._bbr is not None
            and all(s.sender.buffer_is_empty for s in self._streams.values())
            and not self.app_has_more()
        ):
            self._bbr.mark_app_limited()
        return out

    def _set_peer(self, key: PublicKey) -> None:
        self.peer_key = key

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        install_trust_check(
            self.tls,
            is_client=self._is_client,
            trusted=self.trusted,
            on_peer=self._set_peer,
        )

    # --- link statistics ---------------------------------------------------

    @property
    def smoothed_rtt(self) -> float:
        """Smoothed RTT in seconds (0.0 before the first sample)."""
        return float(self._loss._rtt_smoothed)

    @property
    def min_rtt(self) -> float:
        rtt = float(self._loss._rtt_min)
        return 0.0 if rtt == float("inf") else rtt

    @property
    def congestion_window(self) -> int:
        return int(self._loss.congestion_window)

    @property
    def bytes_in_flight(self) -> int:
        return int(self._loss.bytes_in_flight)

    def send_buffered(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return len(stream.sender._buffer)

    def send_unsent(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` and never sent yet (retransmissions excluded)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return int(stream.sender._buffer_stop - stream.sender.highest_offset)

    def send_acked(self, stream_id: int) -> int:
        """Contiguous bytes of ``stream_id`` the peer has acknowledged."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else int(stream.sender._buffer_start)

    # --- receive-side back-pressure ----------------------------------------

    def pace_stream(self, stream_id: int, window: int) -> PacedStream:
        """Grant ``stream_id`` credit only as ``consume`` reports bytes used."""
        paced = self.paced.get(stream_id)
        if paced is None:
            paced = self.paced[stream_id] = PacedStream(window)
            # aioquic calls _write_stream_limits for every stream in every packet, so
            # the override is installed only once a paced stream exists.
            self._write_stream_limits = self._paced_stream_limits  # type: ignore[method-assign]
        return paced

    def consume(self, stream_id: int, nbytes: int) -> bool:
        """Record that the application took ``nbytes``; True if new credit should be sent."""
        paced = self.paced.get(stream_id)
        if paced is None:
            return False
        paced.consumed += nbytes
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        return paced.consumed + paced.window - stream.max_stream_data_local_sent >= (
            paced.window // 2
        )

    def _paced_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        sid = stream.stream_id
        paced = self.paced.get(sid) if self.paced and sid is not None else None
        if paced is None or sid is None:
            QuicConnection._write_stream_limits(self, builder, space, stream)
            return
        target = paced.consumed + paced.window
        if target - stream.max_stream_data_local_sent < paced.window // 2:
            return
        stream.max_stream_data_local = target
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
            handler=self._on_max_stream_data_delivery,
            handler_args=(stream,),
        )
        buf.push_uint_var(sid)
        buf.push_uint_var(target)
        stream.max_stream_data_local_sent = target
