"""A seeded, virtual-time simulator of sources serving a ``Scheduler``.

Why a simulator: the scheduler's decisions (shares, steals, moves, endgame) can be
compared with the ideal bound T* over many seeded runs in a second, with rates that drop,
sources that die silently and sources that lie, which no test on real links could do
deterministically. Each source serves its requests in order (a pipelined stream) at its
rate, a request reaching it one RTT after it is sent (the request's trip plus the first
byte's); its rate is its profile times a seeded per-second jitter, times (1 - loss) for
the goodput lost to retransmission. The bound is computed from exactly those effective
rates, so a makespan/T* ratio says how far the schedule is from what the links allowed.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from dwcp.itp.bound import RateProfile, bound_profiles
from dwcp.itp.model import Cancel, Chunk, EwmaRates, Exclude, ExplicitHoldings, Request
from dwcp.itp.scheduler import Config, Report, Scheduler


@dataclass(slots=True)
class SimSource:
    """A simulated source: ``profile`` in bytes/s before jitter and loss."""

    name: str
    profile: RateProfile
    rtt: float = 0.05
    loss: float = 0.0
    jitter: float = 0.0
    lies_from: float = math.inf
    lost_at: float = math.inf
    holds: frozenset[int] | None = None
    _fifo: deque[list[float]] = field(default_factory=deque)
    _jit: list[float] = field(default_factory=list)

    def effective(self, t: float) -> float:
        k = int(t)
        j = self._jit[k] if k < len(self._jit) else 1.0
        return self.profile.at(t) * (1 - self.loss) * j

    def effective_profile(self, horizon: float) -> RateProfile:
        times = sorted(
            {float(k) for k in range(int(horizon) + 1)} | {s for s, _ in self.profile.steps}
        )
        return RateProfile(tuple((t, self.effective(t)) for t in times))


@dataclass(frozen=True, slots=True)
class SimResult:
    makespan: float
    bound: float
    report: Report
    correct: bool
    excluded: dict[str, str]
    moved_after: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.makespan / self.bound


def simulate(
    chunks: Sequence[Chunk],
    sources: Sequence[SimSource],
    *,
    seed: int = 0,
    prior: Mapping[str, float] | None = None,
    pessimism: float = 0.8,
    config: Config | None = None,
    dt: float = 0.01,
    tick_every: float = 0.05,
    max_time: float = 3600.0,
    replies: bool = False,
) -> SimResult:
    """Run one transfer to the end; ``prior`` defaults to ``pessimism`` x the first rate.

    ``replies``: as a real pull sees it (``dwcp.migrate.multi``): a source's requests in
    flight share its rate (streams of one connection) and each piece is seen only whole,
    when its reply has arrived, so stall detection gets no byte-level progress.
    """
    rng = random.Random(seed)
    horizon = max_time
    for s in sources:
        s._jit = [1 + s.jitter * (2 * rng.random() - 1) for _ in range(int(horizon) + 2)]
        s._fifo.clear()
    by_name = {s.name: s for s in sources}
    partial = {s.name: s.holds for s in sources if s.holds is not None}
    holdings = ExplicitHoldings(by_name, partial)
    if prior is None:
        prior = {s.name: pessimism * s.effective(0.0) for s in sources}
    sched = Scheduler(
        chunks,
        by_name,
        EwmaRates(prior),
        holdings,
        config,
        rtt={s.name: s.rtt for s in sources},
    )
    sizes = {c.index: c.size for c in chunks}
    got: dict[int, bool] = {}
    excluded: dict[str, str] = {}
    moved_after: dict[str, float] = {}

    def apply(actions: list[Request | Cancel | Exclude], now: float) -> None:
        for a in actions:
            src = by_name[a.source]
            if isinstance(a, Request):
                src._fifo.append([float(a.chunk), now + src.rtt, float(sizes[a.chunk])])
            elif isinstance(a, Cancel):
                for item in list(src._fifo):
                    if int(item[0]) == a.chunk:
                        src._fifo.remove(item)
            else:
                excluded[a.source] = a.reason

    now = 0.0
    apply(sched.start(now), now)
    next_tick = tick_every
    lost_told: set[str] = set()
    while not sched.done and now < max_time:
        now += dt
        for s in sources:
            if now >= s.lost_at and s.name not in lost_told:
                lost_told.add(s.name)
                apply(sched.on_source_lost(s.name, now), now)
            budget = s.effective(now) * dt
            if replies:
                _serve_replies(sched, s, budget, now, got, apply)
                continue
            while budget > 0 and s._fifo and s._fifo[0][1] <= now:
                item = s._fifo[0]
                take = min(budget, item[2])
                budget -= take
                item[2] -= take
                chunk = int(item[0])
                if take > 0:
                    apply(sched.on_progress(s.name, chunk, round(take), now), now)
                if item[2] <= 1e-9:
                    s._fifo.popleft()
                    ok = now < s.lies_from
                    if ok:
                        got.setdefault(chunk, True)
                    apply(sched.on_chunk(s.name, chunk, ok, now), now)
        if now >= next_tick:
            next_tick += tick_every
            apply(sched.tick(now), now)
            if sched.stuck:
                break
    report = sched.report()
    for t, name, what in report.events:
        src = by_name[name]
        dead_at = min(src.lost_at, _last_change(src.profile))
        moved = "dead" in what or "slow" in what or "rate" in what
        if moved and name not in moved_after and t >= dead_at:
            moved_after[name] = t - dead_at
    held = [(c.size, holdings.holders(c.index)) for c in chunks]
    profiles = {s.name: s.effective_profile(max_time) for s in sources}
    for s in sources:
        if s.name in excluded:  # a liar's capacity counts only while it told the truth
            steps = [st for st in profiles[s.name].steps if st[0] < s.lies_from]
            profiles[s.name] = RateProfile((*steps, (max(s.lies_from, 0.0), 0.0)))
    t_star = bound_profiles(held, profiles, horizon=max_time)
    return SimResult(
        makespan=now,
        bound=t_star,
        report=report,
        correct=sched.done and len(got) == len(chunks),
        excluded=excluded,
        moved_after=moved_after,
    )


def _serve_replies(
    sched: Scheduler,
    s: SimSource,
    budget: float,
    now: float,
    got: dict[int, bool],
    apply: Callable[[list[Request | Cancel | Exclude], float], None],
) -> None:
    """One step of ``s`` sending its arrived requests' replies side by side."""
    active = [item for item in s._fifo if item[1] <= now]
    finished = []
    for item in active:
        item[2] -= budget / len(active)
        if item[2] <= 1e-9:
            finished.append(item)
    for item in finished:
        s._fifo.remove(item)
        chunk = int(item[0])
        size = sched.chunk_size(chunk)
        apply(sched.on_progress(s.name, chunk, size, now), now)
        ok = now < s.lies_from
        if ok:
            got.setdefault(chunk, True)
        apply(sched.on_chunk(s.name, chunk, ok, now), now)


def _last_change(profile: RateProfile) -> float:
    """When a profile last changes (a drop, a death), else infinity."""
    return profile.steps[-1][0] if len(profile.steps) > 1 else math.inf
