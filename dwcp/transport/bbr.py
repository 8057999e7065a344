"""A rate-based (BBR v1-style) congestion controller for aioquic, registered as "dwcp-bbr".

Why: Reno and CUBIC halve their window on every loss, so on a long link with
random (non-congestive) loss one connection settles far below the link rate
(Mathis: ~4 Mbit/s at 50 ms and 0.5% loss). This controller models the path
instead and sends at the modelled rate, so random loss costs only the lost
packets:

- Bandwidth: the windowed max, over the last ``BW_ROUNDS`` packet-timed
  rounds, of per-ACK delivery-rate samples. A sample divides the bytes
  delivered while a packet was in flight by the longer of its send and ACK
  intervals, so a burst of late ACKs (a receiver that woke up late) cannot
  claim more than the rate the data was sent at; samples over less than one
  min-RTT are dropped.
- Propagation delay: the lowest RTT seen in the last ``MIN_RTT_WINDOW`` s.
- Pacing rate = pacing gain x bandwidth (the pacer in ``quic.BurstPacer`` reads
  ``pacing_rate``); the window (``CWND_GAIN`` x bandwidth x min-RTT, plus
  ``QUANTUM_BUDGET`` send quanta for the pacer's bursts and the peer's clumped
  ACKs, as Linux does) is only a cap on what is in flight. Sending at the
  modelled rate, not at window / RTT, is what keeps the bottleneck queue near empty.
- Modes: STARTUP (gain 2/ln 2, window grows like slow start) until the
  bandwidth grew less than 25% in 3 rounds, or earlier once 8 RTT samples in
  a row show a queue (1.25 x min-RTT): with a 1-BDP drop-tail buffer the
  3-round rule alone overflows it (25-36% loss for half a second, measured);
  DRAIN (inverse gain) until the queue it built is gone; then PROBE_BW, a
  cycle of one-min-RTT phases with gains 1.25 (look for more bandwidth), 0.75
  (drain what that probe queued), then six at 1.0. Controllers start the
  cycle at staggered phases so several connections do not probe at once.
- Delay correction: per-ACK samples are noisy (Python endpoints ack in
  batches), and the max filter keeps the high ones, so the estimate ran
  2-8% above the link and a standing queue filled the 1-BDP buffer (RTT 2 x,
  thousands of tail drops). A cycle whose every RTT sample exceeded
  ``QUEUE_RTT`` x min-RTT and ``QUEUE_MIN`` above it, less the ACK delay the
  peer reported (the queue outlived the 0.75 phase) scales the
  estimate by ``BW_SCALE_DOWN`` (floor ``BW_SCALE_MIN``) and drains instead
  of probing; a cycle that saw the empty-queue RTT recovers it slowly. The
  same signal makes several connections on one bottleneck back off.
- No PROBE_RTT: it exists to see the propagation delay through a standing
  queue; here every cycle's 0.75 phase drains the queue this sender built, so
  a fresh minimum arrives every 8 rounds, and an expired minimum is simply
  replaced by the next sample. That saves BBR's 200 ms at 4 packets every
  10 s (~2-3% of the goodput).
- Application-limited samples: a sender that ran out of data (a node that
  mostly receives and answers with small control messages) measures its own
  message rate, not the path's. As in Linux BBR, the connection marks itself
  app-limited when it has nothing left to send (``mark_app_limited``); a
  sample from a packet sent then only counts if it raises the estimate, a
  round that learned nothing does not age the filter, and it cannot end
  STARTUP (nor can its RTT samples: a queue they see is another sender's,
  typically the reverse direction's data). An app-limited sender in STARTUP
  paces at least at the initial window's rate (gain x 10 packets / min-RTT),
  so it sends a reply as fast as a new connection would: before this, a
  destination's 4 KB reply after a 30 MB transfer left at one packet per
  round trip.
- Loss: isolated losses change nothing. A round that loses more than
  ``HEAVY_LOSS`` of its packets (a queue overflowing: a competing flow or our
  own overshoot) resets the bandwidth filter to 0.85 x that round's best
  sample, which drains the queue; random loss of a few percent does not.
- Careful resume (``careful_resume``, ``dwcp.transport.resume``): on a path the
  node knows, a new connection paces at a rate from the path's history (gain 1,
  window ``CWND_GAIN`` x rate x RTT) from its first RTT sample, instead of
  doubling up from 10 packets; once that round is acknowledged without heavy loss
  or a queue it carries on with startup from the measured rate at gain
  ``RESUMED_GAIN`` (slow start's doubling, as in the draft's normal phase: a
  path faster than stored is still found; 2.885 from near the rate overflowed a
  1-BDP buffer at once, 2x cold startup's drops in the simulation), else it retreats to 0.85 x what
  was delivered and drains. A first RTT unlike the stored one means another path: no jump.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable

from aioquic.quic.congestion.base import (
    K_INITIAL_WINDOW,
    K_MINIMUM_WINDOW,
    QuicCongestionControl,
    register_congestion_control,
)
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from dwcp.transport import resume as cr

NAME = "dwcp-bbr"
STARTUP_GAIN = 2.885  # 2 / ln 2: doubles the delivery rate every round
RESUMED_GAIN = 2.0  # startup's gain after a validated careful resume: slow start's doubling
CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
CWND_GAIN = 2.0
BW_ROUNDS = 10
MIN_RTT_WINDOW = 10.0  # seconds
FULL_BW_GROWTH = 1.25  # startup ends after FULL_BW_ROUNDS rounds growing less than this
FULL_BW_ROUNDS = 3
HEAVY_LOSS = 0.05  # of a round's packets, and at least HEAVY_LOSS_MIN of them
HEAVY_LOSS_MIN = 4
HEAVY_LOSS_BACKOFF = 0.85
STARTUP_QUEUE_RTT = 1.25  # startup also ends when STARTUP_QUEUE_SAMPLES RTTs in a row
STARTUP_QUEUE_SAMPLES = 8  # exceed this x min-RTT (and min-RTT + STARTUP_QUEUE_MIN)
STARTUP_QUEUE_MIN = 0.004
QUEUE_RTT = 1.5  # a cycle whose RTTs all exceed this x min-RTT left a standing queue
QUEUE_MIN = 0.004  # s; and at least this above min-RTT (scheduling noise on short paths)
BW_SCALE_DOWN = 0.9
BW_SCALE_UP = 1.02
BW_SCALE_MIN = 0.8

SEND_QUANTUM = 0.001  # s of the pacing rate sent per pacer wake-up (quic.BurstPacer)
QUANTUM_MAX_PACKETS = 64
QUANTUM_BUDGET = 3  # send quanta the window holds above gain x BDP

STARTUP, DRAIN, PROBE_BW = "startup", "drain", "probe_bw"

_start_phase = itertools.count()


def restart_phase_stagger() -> None:
    """Start the stagger of new controllers' cycle phases again from the first.

    The stagger is process-wide (connections opened one after another start at
    different phases), so a simulation that wants the same phases on every run,
    whatever ran before it in the process, calls this first.
    """
    global _start_phase
    _start_phase = itertools.count()


def _next_start_phase() -> int:
    """Stagger the cycle's start over the 1.0 phases (never start by draining)."""
    return 2 + next(_start_phase) % (len(CYCLE) - 2)


class BbrCongestionControl(QuicCongestionControl):
    """BBR v1-style model-based controller (see the module docstring)."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._mss = max_datagram_size
        self._min_window = K_MINIMUM_WINDOW * max_datagram_size * 2
        self.mode = STARTUP
        # min-RTT filter
        self.min_rtt = float("inf")
        self._min_rtt_stamp = 0.0
        # delivery-rate sampling: per packet (delivered, delivered_time, first_sent_time)
        self._delivered = 0
        self._delivered_time = 0.0
        self._first_sent_time = 0.0
        self._sent: dict[int, tuple[int, float, float, bool]] = {}
        self._app_limited_until = 0  # delivered-bytes mark; 0 = not app-limited
        # bandwidth filter: best sample of each of the last BW_ROUNDS rounds
        self._bw_rounds: deque[float] = deque(maxlen=BW_ROUNDS)
        self._round_max = 0.0
        self.round_count = 0
        self._next_round_delivered = 0
        self._round_sent = 0
        self._round_lost = 0
        # startup exit
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        # PROBE_BW cycle
        self.cycle_index = 0
        self._cycle_stamp = 0.0
        self._cycle_lost = False
        # delay correction (see the module docstring)
        self.bw_scale = 1.0
        self._queued_samples = 0
        self._cycle_min_rtt = float("inf")
        self.resume: cr.CarefulResume | None = None
        self._startup_gain = STARTUP_GAIN
        self.ack_delay = 0.0
        """The ACK delay the peer reported for the next RTT sample (set by the connection)."""

    def set_datagram_size(self, size: int) -> None:
        """The connection's datagrams grew (path MTU discovery): the floors scale with them."""
        self._mss = size
        self._min_window = K_MINIMUM_WINDOW * size * 2

    def careful_resume(self, rate: float, rtt: float) -> None:
        """Resume the path's known ``rate`` (bytes/s, the jump rate) at ``rtt`` (s, the stored
        RTT) once the first RTT sample confirms the path; before any data is acknowledged."""
        if self._delivered == 0 and self.mode == STARTUP:
            self.resume = cr.CarefulResume(rate, rtt)

    @property
    def committed_rate(self) -> float:
        """Bytes/s this connection carries or is about to resume (``resume.jump_rate``):
        the jump rate from the start until the resume is decided, then the model's rate."""
        r = self.resume
        if r is not None and (r.active or r.phase == cr.RECON):
            return max(self.bandwidth, r.rate)
        return self.bandwidth

    @property
    def _resuming(self) -> bool:
        return self.resume is not None and self.resume.active

    def _on_resume(self, phase: str | None) -> None:
        """Act on a change of the careful-resume phase."""
        if phase == cr.UNVALIDATED:
            self.congestion_window = max(self.congestion_window, self._target_window())
        elif phase == cr.NORMAL and self.resume is not None and self.resume.validated:
            # Confirmed: startup goes on from the measured rate (it ends after 3 rounds
            # without 25% growth, as usual), so a faster path than stored is still found.
            self._full_bw = self.bandwidth
            self._full_bw_rounds = 0
            self._startup_gain = RESUMED_GAIN
        elif phase == cr.RETREAT:
            best = max(max(self._bw_rounds, default=0.0), self._round_max)
            self._bw_rounds.clear()
            self._round_max = 0.0
            if best > 0:
                self._bw_rounds.append(best * HEAVY_LOSS_BACKOFF)
                self.mode = DRAIN
                self.congestion_window = self._target_window()
            else:
                self.mode = STARTUP
                self._full_bw = 0.0
                self._full_bw_rounds = 0
                self.congestion_window = K_INITIAL_WINDOW * self._mss

    # --- model ----------------------------------------------------------------

    @property
    def bandwidth(self) -> float:
        """Estimated bottleneck rate in bytes per second (0 before the first sample)."""
        bw = self.bw_scale * max(max(self._bw_rounds, default=0.0), self._round_max)
        if self.resume is not None and self.resume.active:
            return max(bw, self.resume.rate)
        return bw

    @property
    def bdp(self) -> float:
        """Estimated bandwidth-delay product in bytes (0 before the model exists)."""
        if self.min_rtt == float("inf"):
            return 0.0
        return self.bandwidth * self.min_rtt

    @property
    def pacing_gain(self) -> float:
        if self._resuming:
            return 1.0
        if self.mode == STARTUP:
            return self._startup_gain
        if self.mode == DRAIN:
            return 1 / STARTUP_GAIN
        return CYCLE[self.cycle_index]

    @property
    def pacing_rate(self) -> float:
        """Bytes per second the pacer should send at; 0.0 = no model yet (pace the window)."""
        rate = self.pacing_gain * self.bandwidth
        if self.mode == STARTUP and self._app_limited_until and self.min_rtt != float("inf"):
            initial = self.pacing_gain * K_INITIAL_WINDOW * self._mss
            rate = max(rate, initial / max(self.min_rtt, 1e-6))
        return rate

    def mark_app_limited(self) -> None:
        """The sender has nothing more to send: what is in flight now measures the
        application, not the path, until it is delivered."""
        self._app_limited_until = max(self._delivered + self.bytes_in_flight, 1)

    def _target_window(self) -> int:
        gain = CWND_GAIN if self.mode == PROBE_BW or self._resuming else STARTUP_GAIN
        return max(int(gain * self.bdp + self._quantum_budget()), self._min_window)

    def _quantum_budget(self) -> float:
        """Room for ``QUANTUM_BUDGET`` send quanta above gain x BDP (Linux BBR's
        quantization budget): the pacer releases a quantum per wake-up and the peer
        acknowledges in clumps (aioquic: 1 ms after the first unacknowledged packet),
        so on a sub-millisecond path 2 x BDP is less than one ACK interval's data
        and the connection is window-bound at a rate that only falls."""
        quantum = min(self.bandwidth * SEND_QUANTUM, QUANTUM_MAX_PACKETS * self._mss)
        return QUANTUM_BUDGET * max(2 * self._mss, quantum)

    def _on_round_end(self, app_limited: bool) -> None:
        heavy = (
            self._round_lost >= HEAVY_LOSS_MIN and self._round_lost > HEAVY_LOSS * self._round_sent
        )
        if heavy and self._round_max > 0 and not self._resuming:
            # A queue overflowed: forget the optimistic samples, send below the latest.
            self._bw_rounds.clear()
            self._bw_rounds.append(self._round_max * HEAVY_LOSS_BACKOFF)
            self._round_max = 0.0
            if self.mode == STARTUP:
                self.mode = DRAIN
        elif not app_limited or self._round_max > 0:
            # (An app-limited round that learned nothing leaves the filter as it is: the
            # model does not age while the sender idles.)
            self._bw_rounds.append(self._round_max)
            self._round_max = 0.0
        if self.mode == STARTUP and not app_limited and not self._resuming:
            bw = self.bandwidth
            if bw >= self._full_bw * FULL_BW_GROWTH:
                self._full_bw = bw
                self._full_bw_rounds = 0
            else:
                self._full_bw_rounds += 1
                if self._full_bw_rounds >= FULL_BW_ROUNDS:
                    self.mode = DRAIN
        self._round_sent = self._round_lost = 0

    def _update_mode(self, now: float) -> None:
        bdp = self.bdp
        if self.mode == DRAIN and self.bytes_in_flight <= bdp:
            self.mode = PROBE_BW
            self.cycle_index = _next_start_phase()
            self._cycle_stamp = now
            self._cycle_lost = False
        elif self.mode == PROBE_BW:
            elapsed = now - self._cycle_stamp
            gain = CYCLE[self.cycle_index]
            full = elapsed > self.min_rtt
            if gain > 1.0:
                advance = (full and (self._cycle_lost or self.bytes_in_flight >= gain * bdp)) or (
                    elapsed > 2 * self.min_rtt
                )
            elif gain < 1.0:
                advance = full or self.bytes_in_flight <= bdp
            else:
                advance = full
            if advance:
                self.cycle_index = (self.cycle_index + 1) % len(CYCLE)
                self._cycle_stamp = now
                self._cycle_lost = False
                if self.cycle_index == 0:
                    self._end_cycle()

    def _end_cycle(self) -> None:
        """Delay correction: a queue that outlived the cycle's drain phase means the
        bandwidth is overestimated (ACK-timing noise, or connections sharing the
        bottleneck): send slower and drain instead of probing; else recover."""
        if self._cycle_min_rtt > max(QUEUE_RTT * self.min_rtt, self.min_rtt + QUEUE_MIN):
            self.bw_scale = max(BW_SCALE_MIN, self.bw_scale * BW_SCALE_DOWN)
            self.cycle_index = 1
        else:
            self.bw_scale = min(1.0, self.bw_scale * BW_SCALE_UP)
        self._cycle_min_rtt = float("inf")

    # --- aioquic hooks ------------------------------------------------------------

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        sent_time = packet.sent_time or 0.0
        if self.bytes_in_flight == 0:
            self._first_sent_time = self._delivered_time = sent_time
        self.bytes_in_flight += packet.sent_bytes
        self._round_sent += 1
        if packet.epoch == Epoch.ONE_RTT:
            self._sent[packet.packet_number] = (
                self._delivered,
                self._delivered_time,
                self._first_sent_time,
                self._app_limited_until > 0,
            )
            if self.resume is not None:
                self._on_resume(
                    self.resume.on_sent(
                        packet.sent_bytes,
                        self._delivered,
                        self.bytes_in_flight,
                        self._app_limited_until > 0,
                    )
                )

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._delivered += packet.sent_bytes
        self._delivered_time = now
        state = (
            self._sent.pop(packet.packet_number, None) if packet.epoch == Epoch.ONE_RTT else None
        )
        if self._app_limited_until and self._delivered > self._app_limited_until:
            self._app_limited_until = 0
        if state is not None:
            delivered0, delivered_time0, first_sent0, app_limited = state
            sent_time = packet.sent_time or 0.0
            self._first_sent_time = sent_time
            interval = max(sent_time - first_sent0, now - delivered_time0)
            if interval >= self.min_rtt and interval > 0:
                rate = (self._delivered - delivered0) / interval
                if rate > self._round_max and (not app_limited or rate > self.bandwidth):
                    self._round_max = rate
            if delivered0 >= self._next_round_delivered:
                self._next_round_delivered = self._delivered
                self.round_count += 1
                self._on_round_end(app_limited)
        if self.resume is not None:
            self._on_resume(self.resume.on_acked(self._delivered))
        self._update_mode(now)
        if self._resuming:
            self.congestion_window = max(self._target_window(), self._min_window)
        elif self.mode == STARTUP or self.bandwidth <= 0:
            self.congestion_window += packet.sent_bytes  # slow start until the model exists
        else:
            self.congestion_window = max(
                min(self.congestion_window + packet.sent_bytes, self._target_window()),
                self._min_window,
            )

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            if packet.epoch == Epoch.ONE_RTT:
                self._sent.pop(packet.packet_number, None)

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        lost = 0
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._round_lost += 1
            self._cycle_lost = True
            lost += 1
            if packet.epoch == Epoch.ONE_RTT:
                self._sent.pop(packet.packet_number, None)
        if self.resume is not None and lost:
            self._on_resume(self.resume.on_lost(lost))

    def on_persistent_congestion(self) -> None:
        # Nothing got through for several PTOs: restart the model from a small window.
        if self.resume is not None:
            self.resume.on_persistent_congestion()
        self._bw_rounds.clear()
        self._round_max = 0.0
        self.mode = STARTUP
        self._startup_gain = STARTUP_GAIN
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self.congestion_window = K_INITIAL_WINDOW * self._mss

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        # The queue signals use the sample less the delay the peer says it held the
        # ACK (RFC 9002 5.3's adjusted RTT); min-RTT takes the raw sample.
        queued = rtt - self.ack_delay if rtt - self.ack_delay >= self.min_rtt else rtt
        self._cycle_min_rtt = min(self._cycle_min_rtt, queued)
        if (
            self.mode == STARTUP
            and self.round_count > 2
            and not self._app_limited_until
            and not self._resuming
        ):
            # A queue is building: leave startup before it overflows a 1-BDP buffer
            # (waiting for 3 rounds without growth would overshoot ~3x). Not when
            # app-limited: then the queue is not ours.
            limit = max(STARTUP_QUEUE_RTT * self.min_rtt, self.min_rtt + STARTUP_QUEUE_MIN)
            self._queued_samples = self._queued_samples + 1 if queued > limit else 0
            if self._queued_samples >= STARTUP_QUEUE_SAMPLES:
                self.mode = DRAIN
        if rtt <= self.min_rtt or now - self._min_rtt_stamp > MIN_RTT_WINDOW:
            self.min_rtt = rtt
            self._min_rtt_stamp = now
        if self.resume is not None:
            # After the min-RTT update: the jump's window is sized from it.
            self._on_resume(self.resume.on_rtt(rtt, self.min_rtt))


register_congestion_control(NAME, BbrCongestionControl)
