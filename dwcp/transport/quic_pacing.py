"""Packet-path hooks on aioquic's recovery: a burst-tolerant pacer and the controller's inputs.

Part of the aioquic adapter (``quic``): the private members these touch are
listed in ``quic.PRIVATES`` and checked by ``quic.check_aioquic``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aioquic.buffer import size_uint_var
from aioquic.quic.packet import QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder, QuicSentPacket
from aioquic.quic.recovery import K_MICRO_SECOND, K_SECOND, QuicPacketPacer
from aioquic.tls import Epoch

from dwcp.transport import bbr, pmtud

PACER_BURST_PACKETS = bbr.QUANTUM_MAX_PACKETS
STREAM_FRAME_MAX = 0x3FFF  # aioquic writes a STREAM frame's length as a 2-byte varint
MIN_FRAME_ROOM = 64  # bytes; less room left in a packet ends it


@dataclass
class LinkCounters:
    """Cumulative per-connection counters (read and differenced by the controller)."""

    packets_sent: int = 0
    packets_lost: int = 0


class BurstPacer(QuicPacketPacer):
    """aioquic's token-bucket pacer with a deeper bucket (64 packets instead of 16).

    Why: the bucket is refilled only when the event loop wakes the connection;
    with 16 packets per wake-up and wake-ups every 2-5 ms (uvloop's 1 ms timer
    granularity plus a busy machine), one connection cannot exceed 40-90 Mbit/s
    whatever its window. 64 packets keep bursts below a quarter of the window.

    A rate-based controller (``bbr``) sets the rate itself through
    ``rate_source``; aioquic's own rule (window / smoothed RTT) would let a
    window that is only a cap on what is in flight fill the bottleneck queue.

    A drained bucket waits for a quantum (``bbr.SEND_QUANTUM`` of the rate, at
    least two packets, at most the bucket) rather than for one packet, as
    Linux sizes its TSO bursts: aioquic waits one packet time, so a sender paced
    by the rate (dwcp-bbr) woke up for every one or two packets, and each
    wake-up (timer, epoll, a loopback sendto waking the sleeping receiver, its
    ACK) cost more than the packet. That halved goodput and, with it, the
    bandwidth estimate (a spiral: 135 CPU-s/GB at 14 Mbit/s on loopback where
    Reno took 32 at 56 Mbit/s, 2026-12-04).
    """

    rate_source: Callable[[], float] | None = None
    quantum_time: float = 0.0

    def next_send_time(self, now: float) -> float:  # aioquic's annotation; None = send now
        if self.packet_time is None:
            return None  # type: ignore[return-value]
        self.update_bucket(now=now)
        if self.bucket_time <= 0:
            return now + max(self.packet_time, self.quantum_time)
        return None  # type: ignore[return-value]

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        mss = self._max_datagram_size
        rate = self.rate_source() if self.rate_source is not None else 0.0
        pacing_rate = rate if rate > 0 else congestion_window / max(smoothed_rtt, K_MICRO_SECOND)
        self.packet_time = max(K_MICRO_SECOND, min(mss / pacing_rate, K_SECOND))
        burst = max(2 * mss, min(congestion_window // 4, PACER_BURST_PACKETS * mss))
        self.bucket_max = burst / pacing_rate
        self.quantum_time = min(self.bucket_max, max(2 * self.packet_time, bbr.SEND_QUANTUM))
        if self.bucket_time > self.bucket_max:
            self.bucket_time = self.bucket_max


def count_packets(cc: Any, counters: LinkCounters, probes: set[int]) -> None:
    """Count sent and lost packets by wrapping the controller's two hooks.

    Lost path-MTU probes (packet numbers in ``probes``) are not congestion: the
    controller hears of them as expired (out of flight, no reaction)."""
    lost_hook: Callable[..., None] = cc.on_packets_lost
    sent_hook: Callable[..., None] = cc.on_packet_sent

    def on_packets_lost(*, now: float, packets: Iterable[QuicSentPacket]) -> None:
        packets = list(packets)
        if probes:
            expired = [p for p in packets if p.packet_number in probes]
            if expired:
                probes.difference_update(p.packet_number for p in expired)
                cc.on_packets_expired(packets=expired)
                packets = [
                    p for p in packets if p.packet_number not in {e.packet_number for e in expired}
                ]
                if not packets:
                    return
        counters.packets_lost += len(packets)
        lost_hook(now=now, packets=packets)

    def on_packet_sent(*, packet: QuicSentPacket) -> None:
        counters.packets_sent += 1
        sent_hook(packet=packet)

    cc.on_packets_lost = on_packets_lost
    cc.on_packet_sent = on_packet_sent


def report_ack_delay(recovery: Any, cc: bbr.BbrCongestionControl) -> None:
    """Hand dwcp-bbr the ACK delay the peer reports, before the RTT sample it qualifies
    (aioquic passes the controller the raw sample only)."""
    original: Callable[..., None] = recovery.on_ack_received

    def on_ack_received(*, ack_rangeset: Any, ack_delay: float, now: float, space: Any) -> None:
        cc.ack_delay = min(ack_delay, recovery.max_ack_delay)
        original(ack_rangeset=ack_rangeset, ack_delay=ack_delay, now=now, space=space)

    recovery.on_ack_received = on_ack_received


def probe_datagram(
    conn: Any, size: int, now: float, on_delivery: Callable[..., None]
) -> list[tuple[bytes, Any]]:
    """One ``size``-byte datagram of PING + PADDING on ``conn``'s current path, registered
    with its loss recovery like any packet (``on_delivery(state, size)`` hears its fate);
    its packet number is ``conn._packet_number`` before the call."""
    path = conn._network_paths[0]
    builder = QuicPacketBuilder(
        host_cid=conn.host_cid,
        is_client=conn._is_client,
        max_datagram_size=size,
        packet_number=conn._packet_number,
        peer_cid=conn._peer_cid.cid,
        quic_logger=conn._quic_logger,
        version=conn._version,
    )
    builder.start_packet(QuicPacketType.ONE_RTT, conn._cryptos[Epoch.ONE_RTT])
    buf = builder.start_frame(QuicFrameType.PING, handler=on_delivery, handler_args=(size,))
    buf.push_bytes(bytes(builder.remaining_buffer_space))  # PADDING frames are zero bytes
    out: list[tuple[bytes, Any]] = conn._flush_builder(
        builder=builder, network_path=path, peer_cid=conn._peer_cid.cid, now=now
    )
    return out


def set_datagram_size(conn: Any, size: int) -> None:
    """Make ``conn`` build ``size``-byte datagrams from now on (pacer and controller too)."""
    conn._max_datagram_size = size
    recovery = conn._loss
    recovery._pacer._max_datagram_size = size
    cc = recovery._cc
    if isinstance(cc, bbr.BbrCongestionControl):
        cc.set_datagram_size(size)
    elif hasattr(cc, "_max_datagram_size"):
        cc._max_datagram_size = size


def write_stream_frames(conn: Any, builder: QuicPacketBuilder, stream: Any, max_offset: int) -> int:
    """aioquic's ``_write_stream_frame`` for datagrams past 16 KiB: as many STREAM frames
    of at most ``STREAM_FRAME_MAX`` bytes as the packet holds (one frame as large as the
    packet would overflow aioquic's 2-byte length); returns the new bytes sent."""
    sender = stream.sender
    used = 0
    while True:
        overhead = 3 + size_uint_var(stream.stream_id)
        if sender.next_offset:
            overhead += size_uint_var(sender.next_offset)
        room = min(builder.remaining_flight_space - overhead, STREAM_FRAME_MAX)
        if room < MIN_FRAME_ROOM and used:
            return used
        previous = sender.highest_offset
        frame = sender.get_frame(room, max_offset)
        if frame is None:
            return used
        frame_type = QuicFrameType.STREAM_BASE | 2 | (4 if frame.offset else 0) | int(frame.fin)
        buf = builder.start_frame(
            frame_type,
            capacity=overhead,
            handler=sender.on_data_delivery,
            handler_args=(frame.offset, frame.offset + len(frame.data), frame.fin),
        )
        buf.push_uint_var(stream.stream_id)
        if frame.offset:
            buf.push_uint_var(frame.offset)
        buf.push_uint16(len(frame.data) | 0x4000)
        buf.push_bytes(frame.data)
        if conn._quic_logger is not None and builder.quic_logger_frames is not None:
            builder.quic_logger_frames.append(
                conn._quic_logger.encode_stream_frame(frame, stream_id=stream.stream_id)
            )
        used += int(sender.highest_offset - previous)
        if frame.fin or sender.buffer_is_empty:
            return used


def watch_black_hole(cc: Any, on_collapse: Callable[[], None]) -> None:
    """Call ``on_collapse`` on persistent congestion (nothing acknowledged for several
    PTOs), before the controller restarts: the path may no longer carry the probed
    size (RFC 8899 4.4's black hole)."""
    hook: Callable[[], None] = cc.on_persistent_congestion

    def on_persistent_congestion() -> None:
        on_collapse()
        hook()

    cc.on_persistent_congestion = on_persistent_congestion


class PathMtu:
    """One connection's side of path MTU discovery: when to probe, what a probe's fate
    changes (``pmtud.PmtuSearch`` decides), which packet numbers are probes."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.enabled = True
        self.probes: set[int] = set()
        self.peer_max = pmtud.MAX_DATAGRAM
        """The peer's max_udp_payload_size transport parameter (RFC 9000's default)."""
        self.search: pmtud.PmtuSearch | None = None
        self._now = 0.0

    def datagrams(self, now: float) -> list[tuple[bytes, Any]]:
        """A probe to send with this batch, if one is due (after the handshake's confirmation)."""
        conn = self.conn
        self._now = now
        if not (self.enabled and conn._handshake_confirmed and not conn._close_pending):
            return []
        if self.search is None:
            cap = min(self.peer_max, pmtud.interface_mtu() - pmtud.IP_UDP_OVERHEAD)
            self.search = pmtud.PmtuSearch(conn._max_datagram_size, cap)
        size = self.search.probe_due(now)
        if size is None or not conn._network_paths:
            return []
        recovery = conn._loss
        if recovery.bytes_in_flight + size > recovery.congestion_window:
            # Congestion-controlled like any packet (RFC 8899 3): a 64 KiB probe in a
            # young window blocked data until a PTO declared it lost (+0.8 s on a 1 MB
            # transfer over 50 ms); it waits for a window that holds it.
            return []
        self.probes.add(conn._packet_number)
        self.search.sent(size)
        return probe_datagram(conn, size, now, self._on_delivery)

    def _on_delivery(self, state: QuicDeliveryState, size: int) -> None:
        search = self.search
        if search is None:
            return
        if state == QuicDeliveryState.ACKED:
            self.probes.clear()  # at most one probe is out (a lost one: count_packets drops it)
            search.acked(size, self._now)
            if search.size > self.conn._max_datagram_size:
                set_datagram_size(self.conn, search.size)
        else:
            search.lost(size, self._now)

    def black_hole(self) -> None:
        """Persistent congestion with datagrams above the base size: back to the base."""
        search = self.search
        if search is not None and search.size > search.base:
            search.black_hole(self._now)
            set_datagram_size(self.conn, search.base)
