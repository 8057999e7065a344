"""The live-migration phase machine in virtual time: order, deadlines, the failure rule."""

from __future__ import annotations

import pytest

from dwcp.live.phases import ORDER, Outcome, Phase, PhaseMachine
from dwcp.live.postcopy import Stall


def run_to(pm: PhaseMachine, last: Phase, step: float = 1.0) -> float:
    now = 0.0
    pm.start(now)
    for ph in ORDER[1 : ORDER.index(last) + 1]:
        now += step
        pm.advance(ph, now)
    return now


@pytest.mark.parametrize("phase", ORDER[:-1])
def test_failure_before_the_commit_resumes_the_source(phase: Phase) -> None:
    pm = PhaseMachine()
    run_to(pm, phase)
    want = (
        Outcome.DESTINATION_RUNS
        if ORDER.index(phase) > ORDER.index(Phase.COMMIT)
        else (Outcome.RESUME_SOURCE)
    )
    assert pm.on_failure() is want


def test_a_commit_that_did_not_return_keeps_the_source() -> None:
    pm = PhaseMachine()
    run_to(pm, Phase.COMMIT)
    assert not pm.committed and pm.on_failure() is Outcome.RESUME_SOURCE
    pm.advance(Phase.RUN, 10.0)
    assert pm.committed and pm.on_failure() is Outcome.DESTINATION_RUNS


def test_phases_only_move_forward_one_at_a_time() -> None:
    pm = PhaseMachine()
    pm.start(0.0)
    with pytest.raises(ValueError):
        pm.advance(Phase.RAM, 1.0)
    pm.advance(Phase.PREPARE, 1.0)
    with pytest.raises(ValueError):
        pm.advance(Phase.CLAIM, 2.0)


def test_every_wait_has_a_deadline() -> None:
    pm = PhaseMachine(deadlines={p: 5.0 for p in Phase})
    pm.start(100.0)
    pm.advance(Phase.PREPARE, 101.0)
    assert pm.deadline() == 106.0
    assert not pm.expired(105.9) and pm.expired(106.0)
    assert pm.remaining(104.0) == 2.0 and pm.remaining(200.0) == 0.0


def test_downtime_runs_from_the_source_pause_to_the_destination_running() -> None:
    pm = PhaseMachine()
    end = run_to(pm, Phase.DONE, step=0.5)
    assert pm.downtime() == pytest.approx(end - (0.5 * ORDER.index(Phase.SWITCH)))
    assert not pm.expired(end + 1e6)


@pytest.mark.parametrize("phase", ORDER[:-1])
def test_postcopy_failure_before_the_commit_resumes_the_source_after_it_holds_it(
    phase: Phase,
) -> None:
    # postcopy commits owner=destination BEFORE migrate-start-postcopy: a failed (or
    # unanswered) commit resumes the source; after the commit the source is neither
    # resumed nor quit (it holds the pages the destination lacks): never both running
    pm = PhaseMachine(postcopy=True)
    run_to(pm, phase)
    after = ORDER.index(phase) > ORDER.index(Phase.COMMIT)
    assert pm.on_failure() is (Outcome.HOLD_SOURCE if after else Outcome.RESUME_SOURCE)


def test_postcopy_commit_whose_answer_was_lost_is_settled_by_the_registry() -> None:
    pm = PhaseMachine(postcopy=True)
    run_to(pm, Phase.COMMIT)
    assert pm.settle(False) is Outcome.RESUME_SOURCE  # the registry: still the source's
    assert pm.settle(True) is Outcome.HOLD_SOURCE  # the peer's: keep the paused copy
    assert PhaseMachine().settle(True) is Outcome.DESTINATION_RUNS  # pre-copy: it has it all


def test_a_postcopy_stream_that_stops_moving_counts_as_a_lost_link() -> None:
    st = Stall(10.0, 0.0)
    assert not any(st.feed(float(t), t * 1000) for t in range(30))  # moving: never
    assert not st.feed(35.0, 29_000) and st.feed(39.0, 29_000)  # 10 s still: lost
    assert not st.feed(40.0, 29_001)  # a byte moved: the clock restarts
