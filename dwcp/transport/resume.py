"""Careful resume: start a connection on a known path at a rate from its history, safely.

Why: BBR's startup doubles from a 10-packet window, so every new connection spends
its first round trips far below a path whose rate the node already measured in
earlier sessions (``dwcp.pba.paths``). This is the sender-side algorithm of
draft-ietf-tsvwg-careful-resume, adapted to a rate-based controller: it is a
plain state machine fed the controller's events (no clock, no socket), and
``dwcp.transport.bbr`` acts on its phase.

- RECONNAISSANCE: the connection starts as a cold one until its first RTT sample
  (the handshake gives one). If that RTT is not within ``RTT_LOW``-``RTT_HIGH``
  x the stored RTT, the path is not the one the history describes: no resume
  (phase NORMAL, ``reason`` says why).
- UNVALIDATED: the controller paces at the jump rate (a fraction of the stored
  bandwidth, chosen by the caller: ``dwcp.pba.paths.PathRecord.resume_hint``)
  with a window of ``bbr.CWND_GAIN`` x that rate x RTT, until one round's worth at
  that rate (rate x stored RTT) has been sent.
- VALIDATING: until everything sent so far is acknowledged, still at the jump rate.
  Then, if less than ``LOSS`` of the packets sent since the jump were lost (and no
  queue appeared), the jump is confirmed (phase NORMAL, ``validated``): the
  controller carries on with startup from the measured rate.
- SAFE RETREAT: heavy loss (``LOSS``, at least ``LOSS_MIN`` packets) or
  ``QUEUE_SAMPLES`` RTT samples in a row above ``QUEUE_RTT`` x the min RTT while
  unvalidated or validating mean the path is slower than remembered: the controller
  drops the jump rate, falls back to what was actually delivered, and drains.
"""

from __future__ import annotations

from collections.abc import Iterable

RECON, UNVALIDATED, VALIDATING, RETREAT, NORMAL = (
    "reconnaissance",
    "unvalidated",
    "validating",
    "retreat",
    "normal",
)
RTT_LOW = 0.5  # the first RTT must be within these x the stored RTT to resume
RTT_HIGH = 2.0
QUEUE_RTT = 2.0  # while resuming, this many RTTs in a row above this x min-RTT = queue
# (2, not 1.5: a QUIC receiver may delay its ACKs by 25 ms, half of a 50 ms path)
QUEUE_MIN = 0.004  # (and above min-RTT + this, for short paths)
QUEUE_SAMPLES = 8
LOSS = 0.05  # of the packets sent since the jump, and at least LOSS_MIN of them
LOSS_MIN = 4
MIN_SHARE = 0.1  # a session's next connection jumps only if this much of the path is left


def jump_rate(total: float, committed: Iterable[float]) -> float:
    """The jump rate (bytes/s) for a session's next connection on a known path; 0 = start cold.

    Why: a session's first connection resumes the path's WHOLE stored rate ``total``
    (the others are still handshaking, and waiting for them would leave the path
    idle), so a later connection gets only what the connections already up do not
    resume or carry (``committed``, bytes/s each): the session as a whole never
    jumps above the stored rate, however many connections it opens. Less than
    ``MIN_SHARE`` of the path left is not worth a jump (the connection starts cold
    and BBR shares the path out as usual).
    """
    left = total - sum(committed)
    return left if total > 0 and left >= MIN_SHARE * total else 0.0


class CarefulResume:
    """The phases of one connection's resume (see the module docstring).

    ``rate`` is the jump rate in bytes per second, ``rtt`` the stored RTT in seconds.
    Feed it ``on_rtt``, ``on_sent``, ``on_acked`` and ``on_lost``; each returns the
    new phase when it changed (else None), for the controller to act on.
    """

    def __init__(self, rate: float, rtt: float) -> None:
        if not rate > 0 or not rtt > 0:
            raise ValueError(f"careful resume needs a positive rate and RTT, not {rate}, {rtt}")
        self.rate = rate
        self.saved_rtt = rtt
        self.phase = RECON
        self.reason = ""
        self.validated = False
        self._sent_bytes = 0
        self._sent = 0
        self._lost = 0
        self._queued = 0
        self._until = 0  # VALIDATING ends once this many bytes are delivered

    @property
    def active(self) -> bool:
        """True while the controller should pace at the jump rate."""
        return self.phase in (UNVALIDATED, VALIDATING)

    def _to(self, phase: str, reason: str) -> str:
        self.phase, self.reason = phase, reason
        return phase

    def on_rtt(self, rtt: float, min_rtt: float) -> str | None:
        if self.phase == RECON:
            if RTT_LOW * self.saved_rtt <= rtt <= RTT_HIGH * self.saved_rtt:
                return self._to(UNVALIDATED, "rtt matches the stored path")
            return self._to(
                NORMAL, f"rtt {rtt * 1000:.1f} ms vs stored {self.saved_rtt * 1000:.1f} ms"
            )
        if self.active:
            base = min(min_rtt, self.saved_rtt)
            if rtt > max(QUEUE_RTT * base, base + QUEUE_MIN):
                self._queued += 1
                if self._queued >= QUEUE_SAMPLES:
                    return self._to(RETREAT, f"queue: rtt {rtt * 1000:.1f} ms")
            else:
                self._queued = 0
        return None

    def on_sent(
        self, nbytes: int, delivered: int, in_flight: int, app_limited: bool = False
    ) -> str | None:
        """A packet of ``nbytes`` left; ``delivered`` and ``in_flight`` count bytes,
        in_flight including this packet. Packets of an app-limited sender (an idle
        session's pings) do not use up the unvalidated round: they test nothing."""
        if not self.active:
            return None
        self._sent += 1
        if self.phase == UNVALIDATED and not app_limited:
            self._sent_bytes += nbytes
            if self._sent_bytes >= self.rate * self.saved_rtt:
                self._until = delivered + in_flight
                return self._to(VALIDATING, "one round sent at the jump rate")
        return None

    def on_acked(self, delivered: int) -> str | None:
        if self.phase == VALIDATING and delivered >= self._until:
            if self._heavy_loss():
                return self._to(RETREAT, f"lost {self._lost} of {self._sent} packets")
            self.validated = True
            return self._to(NORMAL, "validated")
        return None

    def on_lost(self, packets: int) -> str | None:
        if not self.active:
            return None
        self._lost += packets
        if self._heavy_loss():
            return self._to(RETREAT, f"lost {self._lost} of {self._sent} packets")
        return None

    def _heavy_loss(self) -> bool:
        return self._lost >= LOSS_MIN and self._lost > LOSS * self._sent

    def on_persistent_congestion(self) -> str | None:
        if self.phase in (RECON, UNVALIDATED, VALIDATING):
            return self._to(RETREAT, "persistent congestion")
        return None
