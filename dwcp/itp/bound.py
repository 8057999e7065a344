"""The ideal makespan T* of a multi-source transfer, to compare schedules against.

T* = max(S / B_recv, max over source subsets A of S_A / sum of b_i over A), where S_A is
the bytes held only within A (a max-flow / Hall condition: the chunks only A holds must
all come through A's links). With rates that change during the transfer, the same
condition holds for capacities: T* is the least T at which every subset A could have
delivered S_A by T; ``bound_profiles`` finds it by bisection (the condition is monotone
in T). Sources are few (the CLI's --from list, a handful of holders), so the 2^k subsets
are enumerated; above ``MAX_SOURCES`` that is refused rather than left to run for ever.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

MAX_SOURCES = 16


@dataclass(frozen=True, slots=True)
class RateProfile:
    """A piecewise-constant rate: ``steps`` are (from time, bytes per second), sorted."""

    steps: tuple[tuple[float, float], ...]

    @classmethod
    def constant(cls, rate: float) -> RateProfile:
        return cls(((0.0, rate),))

    def at(self, t: float) -> float:
        """The rate in force at time ``t``."""
        current = 0.0
        for start, rate in self.steps:
            if start > t:
                break
            current = rate
        return current

    def integral(self, t: float) -> float:
        """Bytes the source could deliver in [0, t]."""
        total = 0.0
        for i, (start, rate) in enumerate(self.steps):
            if start >= t:
                break
            end = self.steps[i + 1][0] if i + 1 < len(self.steps) else math.inf
            total += rate * (min(end, t) - start)
        return total


def _groups(sizes: Iterable[tuple[int, frozenset[str]]]) -> dict[frozenset[str], int]:
    groups: dict[frozenset[str], int] = {}
    for size, holders in sizes:
        if not holders:
            raise ValueError("a chunk has no holder: no schedule can finish")
        groups[holders] = groups.get(holders, 0) + size
    return groups


def _subsets(sources: Sequence[str]) -> Iterable[frozenset[str]]:
    if len(sources) > MAX_SOURCES:
        raise ValueError(f"{len(sources)} sources: the bound enumerates subsets, at most 16")
    for k in range(1, len(sources) + 1):
        for combo in combinations(sources, k):
            yield frozenset(combo)


def _held_within(groups: Mapping[frozenset[str], int], subset: frozenset[str]) -> int:
    return sum(size for holders, size in groups.items() if holders <= subset)


def bound(
    sizes: Iterable[tuple[int, frozenset[str]]],
    rates: Mapping[str, float],
    recv_rate: float = math.inf,
) -> float:
    """T* in seconds for chunks given as (size, holders), at constant ``rates`` (bytes/s)."""
    groups = _groups(sizes)
    total = sum(groups.values())
    best = total / recv_rate if recv_rate != math.inf else 0.0
    for subset in _subsets(sorted(rates)):
        held = _held_within(groups, subset)
        if not held:
            continue
        capacity = sum(max(rates[s], 0.0) for s in subset)
        best = max(best, held / capacity if capacity > 0 else math.inf)
    return best


def bound_profiles(
    sizes: Iterable[tuple[int, frozenset[str]]],
    profiles: Mapping[str, RateProfile],
    recv_rate: float = math.inf,
    horizon: float = 1e7,
) -> float:
    """T* when each source's rate follows a profile (a drop, a death: rate 0 from then)."""
    groups = _groups(sizes)
    total = sum(groups.values())
    needs = [
        (subset, held)
        for subset in _subsets(sorted(profiles))
        if (held := _held_within(groups, subset))
    ]

    def feasible(t: float) -> bool:
        if total > recv_rate * t:
            return False
        return all(sum(profiles[s].integral(t) for s in sub) >= held for sub, held in needs)

    if not feasible(horizon):
        return math.inf
    lo, hi = 0.0, horizon
    for _ in range(200):
        mid = (lo + hi) / 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-6 * hi:
            break
    return hi
