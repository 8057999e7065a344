"""The scheduler driven by hand: shares, windows, liars, stalls, endgame, stuck chunks."""

from __future__ import annotations

import pytest

from dwcp.itp import (
    Cancel,
    Config,
    EwmaRates,
    Exclude,
    ExplicitHoldings,
    Request,
    Scheduler,
    StuckError,
    split_chunks,
)

MiB = 1 << 20


def make(
    rates: dict[str, float], n: int = 40, partial: dict[str, range] | None = None
) -> Scheduler:
    return Scheduler(
        split_chunks(n * MiB, MiB),
        rates,
        EwmaRates(rates),
        ExplicitHoldings(rates, partial),
        rtt={s: 0.05 for s in rates},
    )


def queued(s: Scheduler, source: str) -> int:
    return len(s._src[source].queue) + len(s._src[source].flights)


def test_shares_follow_predicted_rates() -> None:
    s = make({"slow": 10 * MiB, "fast": 30 * MiB})
    actions = s.start(0.0)
    assert all(isinstance(a, Request) for a in actions)
    assert queued(s, "fast") == 30
    assert queued(s, "slow") == 10


def test_window_covers_the_bandwidth_delay_product() -> None:
    s = Scheduler(
        split_chunks(100 * MiB, MiB),
        ["a"],
        EwmaRates({"a": 100 * MiB}),
        ExplicitHoldings(["a"]),
        rtt={"a": 0.1},
    )
    # 100 MiB/s x 0.1 s = 10 pieces of 1 MiB in flight, plus one.
    assert len(s.start(0.0)) == 11


def test_rarest_chunks_go_to_their_only_holder() -> None:
    s = make({"a": 10 * MiB, "b": 100 * MiB}, n=20, partial={"b": range(10, 20)})
    s.start(0.0)
    held_by_a = set(s._src["a"].queue) | set(s._src["a"].flights)
    assert set(range(10)) <= held_by_a


def test_liar_is_excluded_and_its_chunk_fetched_elsewhere() -> None:
    s = make({"liar": 10 * MiB, "good": 10 * MiB}, n=4)
    first = s.start(0.0)
    liar_chunk = next(a.chunk for a in first if a.source == "liar")
    s.on_progress("liar", liar_chunk, MiB, 0.2)
    actions = s.on_chunk("liar", liar_chunk, ok=False, now=0.2)
    assert any(isinstance(a, Exclude) and a.source == "liar" for a in actions)
    assert liar_chunk in s.in_flight("good") or liar_chunk in s._src["good"].queue
    assert s.report().rejected_bytes == MiB
    # Whatever the liar sends later is never accepted.
    assert not any(isinstance(a, Request) and a.source == "liar" for a in s.tick(0.3))
    assert s.report().sources["liar"].state == "excluded"


def test_silent_source_is_declared_dead_and_its_work_moved() -> None:
    s = make({"a": 10 * MiB, "b": 10 * MiB}, n=10)
    s.start(0.0)
    b_work = set(s.in_flight("b")) | set(s._src["b"].queue)
    assert not [a for a in s.tick(1.0) if isinstance(a, Cancel)]
    s.on_progress("a", s.in_flight("a")[0], 1000, 1.05)  # a is alive
    actions = s.tick(1.1)  # nothing from b for RTT + stall_timeout
    assert {a.chunk for a in actions if isinstance(a, Cancel) and a.source == "b"}
    a_work = set(s.in_flight("a")) | set(s._src["a"].queue)
    assert b_work <= a_work
    assert s.report().sources["b"].state == "dead"


def test_lost_source_only_holder_leaves_chunks_stuck() -> None:
    s = make({"a": 10 * MiB, "b": 10 * MiB}, n=10, partial={"a": range(5)})
    s.start(0.0)
    s.on_source_lost("b", 0.1)
    assert s.stuck == set(range(5, 10))
    with pytest.raises(StuckError, match="--from"):
        s.check()


def test_endgame_duplicates_the_last_chunk_and_cancels_the_loser() -> None:
    s = Scheduler(
        split_chunks(2 * MiB, MiB),
        ["slow", "fast"],
        EwmaRates({"slow": 0.1 * MiB, "fast": 10 * MiB}),
        ExplicitHoldings(["slow", "fast"]),
        Config(endgame_budget=0.5, measure_interval=100.0),
    )
    s.start(0.0)
    # Both chunks start at fast (it finishes each sooner), so give slow one by hand:
    # fast delivers one; the other is in flight there; slow is idle and duplicates nothing
    # that it would not finish sooner.
    first = s.in_flight("fast")
    assert len(first) == 2
    s.on_progress("fast", first[0], MiB, 0.1)
    s.on_chunk("fast", first[0], True, 0.1)
    assert s.in_flight("slow") == []
    # Now fast stalls half-way through the last chunk; slow would not be sooner at
    # 0.1 MiB/s either, until fast is measured slower.
    s.on_progress("fast", first[1], MiB // 2, 0.6)
    s._src["fast"].plan_rate = 0.001 * MiB
    actions = s.tick(0.7)
    assert Request("slow", first[1]) in actions
    s.on_progress("slow", first[1], MiB, 5.0)
    actions = s.on_chunk("slow", first[1], True, 5.0)
    assert Cancel("fast", first[1]) in actions
    assert s.done
    assert s.report().duplicate_bytes == MiB // 2


def test_a_stalled_only_holder_is_given_another_chance_before_the_pull_fails() -> None:
    """A source that merely went quiet (a loaded host, a long GC) is not gone: when the
    alternative is failing the pull, it is tried again with a doubled stall timeout;
    only a source that stalls every time, or whose connection is lost, ends it."""
    s = make({"a": 10 * MiB, "b": 10 * MiB}, n=10)
    s.start(0.0)
    s.on_source_lost("b", 0.05)  # b is gone for good: a is the only holder left
    s.on_progress("a", s.in_flight("a")[0], 1000, 0.1)
    s.tick(1.2)  # a stalls: nothing for RTT + stall_timeout
    assert not s.stuck and s.report().sources["a"].state == "live"
    s.check()  # not stuck: a was revived
    assert any("revived" in what for _, name, what in s.report().events if name == "a")
    assert s.in_flight("a")  # its requests were issued again
    t = 1.2
    for _ in range(10):  # a stays silent: each chance is longer, and they are bounded
        t += 10.0
        s.tick(t)
        if s.stuck:
            break
    assert s.stuck and s.report().sources["a"].state == "dead"
    with pytest.raises(StuckError):
        s.check()
