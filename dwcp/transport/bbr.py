"""A rate-based (BBR-style) congestion controller for aioquic, registered as "dwcp-bbr".

Why: Reno and CUBIC halve their window on every loss, so on a long link with
random (non-congestive) loss one connection settles far below the link rate
(Mathis: ~4 Mbit/s at 50 ms and 0.5% loss). This controller instead models
the path: the bottleneck rate is the highest delivery rate seen over the last
``BW_ROUNDS`` round trips, the propagation delay is the lowest RTT seen, and
the window is ``CWND_GAIN`` x their product, but never less than the estimated
rate x the smoothed RTT: when the RTT is inflated by delay the sender did not
cause (a CPU-bound receiver acking late, loopback), a window of rate x min-RTT
would shrink the delivery rate round after round and collapse; keeping
rate x current RTT in flight sustains the rate without adding a queue. That
term is capped at 2 x min-RTT (min-RTT + 10 ms on sub-5 ms paths) so a standing
queue cannot feed its own growth; queue overflow shows as a round losing more
than ``HEAVY_LOSS`` of its packets, which cuts the bandwidth estimate.
aioquic's pacer then spreads
``cwnd`` over one smoothed RTT. Isolated losses do not shrink the window; only
a round that loses more than ``HEAVY_LOSS`` of its packets (real congestion,
e.g. a competing flow filling the queue) drops the bandwidth estimate.

Simplifications against BBR v1: no PROBE_RTT phase (the minimum RTT never
expires within a connection) and no pacing-gain cycle; the 1.25 window gain is
the standing probe for more bandwidth.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from aioquic.quic.congestion.base import (
    K_INITIAL_WINDOW,
    K_MINIMUM_WINDOW,
    QuicCongestionControl,
    register_congestion_control,
)
from aioquic.quic.packet_builder import QuicSentPacket

NAME = "dwcp-bbr"
CWND_GAIN = 1.25
STARTUP_GROWTH = 1.25  # startup ends after 3 rounds growing less than this
BW_ROUNDS = 10
HEAVY_LOSS = 0.05  # of a round's packets, and at least HEAVY_LOSS_MIN of them
HEAVY_LOSS_MIN = 4
SRTT_CAP = 2.0  # the srtt term counts at most 2 x min-RTT (or min-RTT + 10 ms)


class BbrCongestionControl(QuicCongestionControl):
    """Delivery-rate x min-RTT window with slow-start-like startup (see module docstring)."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._mss = max_datagram_size
        self._min_window = K_MINIMUM_WINDOW * max_datagram_size * 2
        self._min_rtt = float("inf")
        self._srtt = 0.0
        self._bw_samples: deque[float] = deque(maxlen=BW_ROUNDS)  # bytes/s per round
        self._round_start = 0.0
        self._round_delivered = 0
        self._round_lost = 0
        self._round_sent = 0
        self._startup = True
        self._full_bw = 0.0
        self._full_bw_rounds = 0

    # --- model ----------------------------------------------------------------

    @property
    def bandwidth(self) -> float:
        """Estimated bottleneck rate in bytes per second (0 before the first round)."""
        return max(self._bw_samples, default=0.0)

    def _update_window(self) -> None:
        bw = self.bandwidth
        if bw <= 0 or self._min_rtt == float("inf"):
            return
        rtt = min(self._srtt, max(SRTT_CAP * self._min_rtt, self._min_rtt + 0.01))
        target = int(max(CWND_GAIN * self._min_rtt, rtt) * bw)
        if self._startup:
            # Never shrink during startup; the ack-driven growth below leads.
            self.congestion_window = max(self.congestion_window, target)
        else:
            self.congestion_window = max(target, self._min_window)

    def _end_round(self, now: float) -> None:
        elapsed = now - self._round_start
        if self._round_delivered and elapsed > 0:
            self._bw_samples.append(self._round_delivered / elapsed)
        heavy = (
            self._round_lost >= HEAVY_LOSS_MIN and self._round_lost > HEAVY_LOSS * self._round_sent
        )
        if heavy:
            # Congestive loss: forget the optimistic samples, keep the latest.
            latest = self._bw_samples[-1] if self._bw_samples else 0.0
            self._bw_samples.clear()
            if latest:
                self._bw_samples.append(latest * 0.85)
            self._startup = False
        if self._startup:
            bw = self.bandwidth
            if bw >= self._full_bw * STARTUP_GROWTH:
                self._full_bw = bw
                self._full_bw_rounds = 0
            else:
                self._full_bw_rounds += 1
                if self._full_bw_rounds >= 3:
                    self._startup = False
        self._round_start = now
        self._round_delivered = self._round_lost = self._round_sent = 0
        self._update_window()

    # --- aioquic hooks ------------------------------------------------------------

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes
        self._round_sent += 1

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._round_delivered += packet.sent_bytes
        if self._startup:
            self.congestion_window += packet.sent_bytes  # double per round, like slow start
        if self._round_start == 0.0:
            self._round_start = now
        elif self._min_rtt != float("inf") and now - self._round_start >= self._min_rtt:
            self._end_round(now)

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._round_lost += 1

    def on_persistent_congestion(self) -> None:
        # Nothing got through for several PTOs: restart from a small window.
        self._bw_samples.clear()
        self._startup = True
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self.congestion_window = K_INITIAL_WINDOW * self._mss

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        self._srtt = rtt if not self._srtt else 0.875 * self._srtt + 0.125 * rtt
        if rtt < self._min_rtt:
            self._min_rtt = rtt
            self._update_window()


register_congestion_control(NAME, BbrCongestionControl)
