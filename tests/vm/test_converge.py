"""The convergence core in virtual time (no QEMU): a simple model of pre-copy.

Model: each iteration QEMU sends what was dirty at its start at ``min(link, bandwidth)``;
meanwhile the guest dirties ``dirty`` bytes/s (throttled by auto-converge's percentage),
bounded by its working set. QEMU switches over when remaining / rate <= its downtime limit.
"""

from __future__ import annotations

import pytest

from dwcp.errors import UsageError
from dwcp.live import precopy
from dwcp.live.converge import Converger, Kind, Policy, RateMeter, Sample

MB = 1_000_000


class Guest:
    def __init__(self, ram: int, dirty: float, link: float, wss: int) -> None:
        self.remaining = float(ram)
        self.dirty, self.link, self.wss = dirty, link, wss
        self.limit_ms, self.bandwidth, self.iteration = 300, 1 << 40, 1
        self.throttle, self.throttle_max, self.inc = 1, 1, 1
        self.sent_in_iter = 0.0
        self.new = 0.0

    def apply(self, kind: Kind, value: int) -> None:
        if kind is Kind.DOWNTIME:
            self.limit_ms = value
        elif kind is Kind.BANDWIDTH:
            self.bandwidth = value
        elif kind is Kind.AUTO_CONVERGE:
            self.throttle_max, self.throttle = 99, value
        elif kind is Kind.THROTTLE:
            self.inc = value

    def rate(self) -> float:
        return min(self.link, float(self.bandwidth))

    def step(self, dt: float) -> bool:
        """Advance dt; True once QEMU would switch over (what is left of this pass plus
        what was dirtied since its start fits the downtime limit, as QEMU's sync sees)."""
        rate = self.rate()
        sent = min(self.remaining, rate * dt)
        self.remaining -= sent
        self.sent_in_iter += sent
        eff = self.dirty * (100 - self.throttle) / 100
        self.new = min(float(self.wss), self.new + eff * dt)
        if self.remaining <= 0:  # end of a pass: the pages dirtied meanwhile form the next
            if self.throttle_max > 1 and self.new > 0.5 * self.sent_in_iter:
                self.throttle = min(self.throttle_max, self.throttle + self.inc)
            self.remaining, self.new = self.new, 0.0
            self.iteration += 1
            self.sent_in_iter = 0.0
        return (self.remaining + self.new) / rate * 1000 <= self.limit_ms

    def sample(self, now: float) -> Sample:
        return Sample(
            now=now,
            remaining=int(self.remaining),
            dirty_rate=self.dirty * (100 - self.throttle) / 100,
            iteration=self.iteration,
            qemu_rate=self.rate(),
            link_rate=self.rate(),
        )


def run(guest: Guest, policy: Policy, seconds: float = 400.0) -> tuple[str, Converger, float]:
    conv = Converger(policy, 0.0)
    t, dt = 0.0, 0.1
    while t < seconds:
        if guest.step(dt):
            return "switched", conv, t
        for a in conv.feed(guest.sample(t)):
            if a.kind is Kind.ABORT:
                return "aborted", conv, t
            if a.kind is Kind.POSTCOPY:
                return "postcopy", conv, t
            guest.apply(a.kind, a.value)
        t += dt
    return "running", conv, t


def test_idle_guest_converges_without_the_ladder() -> None:
    g = Guest(ram=256 * MB, dirty=0.1 * MB, link=10 * MB, wss=32 * MB)
    got, conv, _ = run(g, Policy())
    assert got == "switched"
    assert conv.rung == 0 and conv.downtime_ms == 300
    assert not any(a.kind in (Kind.AUTO_CONVERGE, Kind.ABORT) for a in conv.log)


def test_near_link_rate_climbs_the_downtime_ladder() -> None:
    # dirty at 97% of the link: pre-copy shrinks the remainder by 3% a pass; without the
    # ladder it would take minutes, with it the 16 MB working set fits ~2 s of downtime
    g = Guest(ram=256 * MB, dirty=9.7 * MB, link=10 * MB, wss=16 * MB)
    got, conv, _ = run(g, Policy(max_downtime_ms=3000))
    assert got == "switched"
    assert conv.rung >= 1 and 300 < conv.downtime_ms <= 3000
    assert g.limit_ms > 300


def test_auto_converge_after_the_downtime_cap() -> None:
    # faster than the link, a working set too big for the cap: only the throttle helps
    g = Guest(ram=256 * MB, dirty=12 * MB, link=10 * MB, wss=200 * MB)
    got, conv, _ = run(g, Policy(max_downtime_ms=1000, timeout_s=300.0))
    assert got == "switched"
    assert any(a.kind is Kind.AUTO_CONVERGE for a in conv.log)
    assert g.throttle > 1


def test_hopeless_guest_aborts_with_a_reason_that_says_what_to_do() -> None:
    # dirtying faster than the link: nothing converges; the ladder runs out, then abort
    g = Guest(ram=256 * MB, dirty=30 * MB, link=10 * MB, wss=250 * MB)
    got, conv, t = run(g, Policy(max_downtime_ms=1000, timeout_s=100.0))
    assert got == "aborted"
    assert conv.aborted is not None and "--max-downtime" in conv.aborted
    assert conv.feed(g.sample(t + 1)) == []  # nothing after an abort


def test_timeout_aborts_even_mid_ladder() -> None:
    g = Guest(ram=256 * MB, dirty=30 * MB, link=10 * MB, wss=250 * MB)
    got, conv, t = run(g, Policy(max_downtime_ms=100_000, timeout_s=20.0))
    assert got == "aborted" and 20.0 <= t < 21.0
    assert conv.aborted is not None and "20 s" in conv.aborted


def test_bandwidth_follows_the_link_and_downtime_scales_with_qemus_overestimate() -> None:
    conv = Converger(Policy(headroom=1.25), 0.0)
    s = Sample(now=1.0, remaining=50 * MB, dirty_rate=0.0, iteration=1,
               qemu_rate=20 * MB, link_rate=5 * MB)  # fmt: skip
    acts = {a.kind: a.value for a in conv.feed(s)}
    assert acts[Kind.BANDWIDTH] == int(5 * MB * 1.25)
    assert acts[Kind.DOWNTIME] == 75  # 300 ms * 5/20: QEMU thinks it sends 4x faster
    # a small change of rate changes nothing (no QMP chatter every poll)
    s2 = Sample(now=1.1, remaining=49 * MB, dirty_rate=0.0, iteration=1,
                qemu_rate=20 * MB, link_rate=5.2 * MB)  # fmt: skip
    assert conv.feed(s2) == []
    unmeasured = Converger(Policy(), 0.0).feed(
        Sample(now=0.1, remaining=1, dirty_rate=0.0, iteration=1, qemu_rate=0.0, link_rate=None)
    )
    assert [a.kind for a in unmeasured] == [Kind.DOWNTIME]


def test_rate_meter_windows() -> None:
    m = RateMeter(window=2.0)
    assert m.add(0.0, 0) is None
    assert m.add(0.5, 5 * MB) is None
    r = m.add(1.0, 10 * MB)
    assert r == 10 * MB
    for i in range(2, 10):
        r = m.add(float(i), 10 * MB + (i - 1) * MB)
    assert r is not None and abs(r - MB) < 1


def test_sample_from_query_migrate() -> None:
    info = {"status": "active", "ram": {"remaining": 1000, "dirty-pages-rate": 10,
            "page-size": 4096, "dirty-sync-count": 3, "mbps": 80.0}}  # fmt: skip
    s = Sample.from_query(2.0, info, 1e6)
    assert (s.remaining, s.dirty_rate, s.iteration, s.qemu_rate) == (1000, 40960, 3, 1e7)
    assert Sample.from_query(0.0, {}, None).remaining == 0


def test_a_zero_link_rate_climbs_no_rung() -> None:
    # the relay measured nothing yet (0 B/s) and the guest dirties nothing: not "outrun"
    # (0 >= 0.7 x 0 divided by the rate: a ZeroDivisionError in the live bench)
    conv = Converger(Policy(), 0.0)
    for i in range(100):
        s = Sample(now=i * 0.5, remaining=4 * MB, dirty_rate=0.0, iteration=3,
                   qemu_rate=10 * MB, link_rate=0.0)  # fmt: skip
        assert all(a.kind is not Kind.ABORT for a in conv.feed(s))
    assert conv.rung == 0


def test_postcopy_is_the_last_rung_only_when_asked() -> None:
    # the hopeless guest: without --postcopy the ladder ends in the abort (above); with it,
    # every earlier rung is climbed first, then postcopy instead of the abort
    g = Guest(ram=256 * MB, dirty=30 * MB, link=10 * MB, wss=250 * MB)
    got, conv, t = run(g, Policy(max_downtime_ms=1000, timeout_s=300.0, postcopy=True))
    assert got == "postcopy" and conv.aborted is None
    kinds = [a.kind for a in conv.log]
    assert kinds[-1] is Kind.POSTCOPY and kinds.count(Kind.POSTCOPY) == 1
    assert kinds.index(Kind.AUTO_CONVERGE) < kinds.index(Kind.POSTCOPY)
    assert conv.downtime_ms == 1000 and conv.throttle == len(Policy().throttle_steps) - 1
    assert conv.postcopy is not None and "postcopy" in conv.postcopy
    assert conv.feed(g.sample(t + 1)) == []  # nothing after the switch
    plain = Guest(ram=256 * MB, dirty=30 * MB, link=10 * MB, wss=250 * MB)
    got, conv, _ = run(plain, Policy(max_downtime_ms=1000, timeout_s=300.0))
    assert got == "aborted" and conv.postcopy is None
    assert Kind.POSTCOPY not in [a.kind for a in conv.log]


def test_postcopy_replaces_the_timeout_abort_and_never_an_idle_switch() -> None:
    g = Guest(ram=256 * MB, dirty=30 * MB, link=10 * MB, wss=250 * MB)
    got, conv, t = run(g, Policy(max_downtime_ms=100_000, timeout_s=20.0, postcopy=True))
    assert got == "postcopy" and 20.0 <= t < 21.0
    idle = Guest(ram=256 * MB, dirty=0.1 * MB, link=10 * MB, wss=32 * MB)
    got, conv, _ = run(idle, Policy(postcopy=True))
    assert got == "switched" and conv.postcopy is None  # pre-copy still does the easy ones


def test_postcopy_options_from_the_op() -> None:
    assert precopy.policy(None, None, None).postcopy is False  # never a default
    assert precopy.policy(None, None, None, True).postcopy is True
    assert precopy.channels(0, None, True) == (0, 1)
    with pytest.raises(UsageError, match="--multifd"):  # QEMU 7.2: not with multifd
        precopy.channels(4, None, True)
