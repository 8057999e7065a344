"""Lifeguard's two timing rules: local health (awareness) and the dynamic suspicion timeout.

Why separate: both are small pure functions of counts, so the tests check them against
memberlist's formulas (``awareness.go``, ``suspicion.go``, ``util.go``) directly.
"""

from __future__ import annotations

import math


class Awareness:
    """Local health score 0..max-1; probe interval and timeout are multiplied by score + 1.

    A member that misses its own acks (it is overloaded, or its network is) slows down
    instead of accusing healthy peers: +1 per failed probe or missing nack or refutation of
    a suspicion about itself, -1 per successful probe.
    """

    __slots__ = ("max", "score")

    def __init__(self, max_multiplier: int = 8) -> None:
        self.max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self.max - 1)

    def scale(self, value: float) -> float:
        return value * (self.score + 1)


def suspicion_min(mult: int, n: int, interval: float) -> float:
    """memberlist's ``suspicionTimeout``: SuspicionMult * max(1, log10 n) * interval."""
    return mult * max(1.0, math.log10(max(1, n))) * interval


def retransmit_limit(mult: int, n: int) -> int:
    """memberlist's ``retransmitLimit``: how often one update rides on outgoing messages."""
    return mult * math.ceil(math.log10(n + 1))


def suspicion_timeout(confirmations: int, wanted: int, lo: float, hi: float) -> float:
    """Lifeguard's timeout after ``confirmations`` independent suspicions (start included not).

    It starts at ``hi`` and falls logarithmically to ``lo`` once ``wanted`` other members
    have confirmed, so a lone (maybe overloaded) accuser waits long enough for a refutation
    and a real failure, seen by many, is still declared quickly.
    """
    if wanted <= 0:
        return lo
    frac = math.log(confirmations + 1.0) / math.log(wanted + 1.0)
    return max(lo, hi - frac * (hi - lo))
