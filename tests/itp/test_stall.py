"""Stall detection as a real pull sees it (issue 15), in virtual time.

A real pull (``dwcp.migrate.multi``) sees each piece only whole, and a source's replies
in flight share its link, so they finish together: the simulator's ``replies`` mode.
The star runs at half its nominal rates with +-50% per-second jitter (what the loaded
2-core bench machine delivered through the emulator), every prior the 1 MB/s default
(no PBA history). With the node's ``PULL_CONFIG``: a killed source's work is moved
within 2 s, and no live source is declared dead on steady links.
"""

from __future__ import annotations

import pytest

from dwcp.itp import Config, EwmaRates, ExplicitHoldings, RateProfile, Scheduler, split_chunks
from dwcp.itp.sim import SimResult, SimSource, simulate
from dwcp.node.pulls import PULL_CONFIG, PULL_PIECE

MBIT = 1e6 / 8
SIZE = 48 << 20
KILL_AT = 3.0


def star(**over: dict[str, object]) -> list[SimSource]:
    out = []
    for mb in (10, 20, 30, 40):
        kw: dict[str, object] = {"rtt": 0.05, "loss": 0.005, "jitter": 0.5}
        kw.update(over.get(f"s{mb}", {}))
        profile = kw.pop("profile", RateProfile.constant(mb * MBIT / 2))
        out.append(SimSource(f"s{mb}", profile, **kw))  # type: ignore[arg-type]
    return out


def run(sources: list[SimSource], seed: int) -> SimResult:
    prior = {s.name: 1e6 for s in sources}
    r = simulate(
        split_chunks(SIZE, PULL_PIECE), sources, seed=seed, prior=prior,
        config=PULL_CONFIG, replies=True, max_time=600.0,
    )  # fmt: skip
    assert r.correct
    return r


def deaths(r: SimResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for t, name, what in r.report.events:
        if what.startswith("dead"):
            out.setdefault(name, t)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_live_source_is_declared_dead_on_steady_links(seed: int) -> None:
    assert deaths(run(star(), seed)) == {}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_killed_source_has_its_work_moved_within_2_s(seed: int) -> None:
    dead = RateProfile(((0, 30 * MBIT / 2), (KILL_AT, 0.0)))
    r = run(star(s30={"profile": dead}), seed)
    died = deaths(r)
    assert set(died) == {"s30"}
    assert died["s30"] - KILL_AT <= 2.0
    moved = [w for t, n, w in r.report.events if n == "s30" and w.startswith("dead")]
    assert "moved" in moved[0]


def test_the_stall_time_grows_with_the_pieces_a_slow_source_has_in_flight() -> None:
    chunks = split_chunks(64 * PULL_PIECE, PULL_PIECE)
    cfg = Config(stall_timeout=1.5, stall_pieces=3.0, min_window=3)
    slow = 100e3  # 3 pieces of 256 KiB at 100 kB/s: ~7.9 s for the three
    s = Scheduler(chunks, ["a"], EwmaRates({"a": slow}), ExplicitHoldings(["a"]), cfg)
    s.start(0.0)
    assert len(s.in_flight("a")) == 3
    first = s.in_flight("a")[0]
    s.on_progress("a", first, PULL_PIECE, 7.0)
    s.on_chunk("a", first, True, 7.0)
    s.tick(12.0)  # 5 s of silence: under 3 x 3 pieces' time at its rate
    assert s.report().sources["a"].state == "live"
    assert not [w for _, _, w in s.report().events if w.startswith("dead")]
    s.tick(40.0)  # > 3 x 3 pieces' time (23.6 s) after the last piece: dead
    assert [w for _, _, w in s.report().events if w.startswith("dead")]
