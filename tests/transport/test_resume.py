"""The careful-resume phases (dwcp.transport.resume) on hand-fed events: no clock, no socket."""

from __future__ import annotations

import pytest

from dwcp.transport import resume as cr

MSS = 1200


def _jumped(rate: float = 1e6, rtt: float = 0.05) -> cr.CarefulResume:
    r = cr.CarefulResume(rate, rtt)
    assert r.on_rtt(0.052, 0.052) == cr.UNVALIDATED and r.active
    return r


def test_a_round_sent_and_acknowledged_without_loss_validates_the_jump() -> None:
    r = _jumped()
    sent = 0
    phase = None
    while phase is None:  # one round at the jump rate: 1e6 x 0.05 = 50 kB
        sent += MSS
        phase = r.on_sent(MSS, 0, sent)
    assert phase == cr.VALIDATING and sent >= 50_000
    assert r.on_acked(sent - MSS) is None  # not everything sent yet acknowledged
    assert r.on_acked(sent) == cr.NORMAL
    assert r.validated and not r.active


def test_app_limited_packets_do_not_use_up_the_unvalidated_round() -> None:
    r = _jumped()
    for _ in range(100):
        assert r.on_sent(MSS, 0, MSS, app_limited=True) is None
    assert r.phase == cr.UNVALIDATED


def test_heavy_loss_while_unvalidated_retreats_and_random_loss_does_not() -> None:
    r = _jumped()
    for _ in range(40):
        r.on_sent(MSS, 0, MSS)
    assert r.on_lost(1) is None  # 1 of 40: random loss
    assert r.on_lost(2) is None  # 3 of 40: under LOSS_MIN
    assert r.on_lost(2) == cr.RETREAT  # 5 of 40 > 5%
    assert not r.active and not r.validated and "lost" in r.reason


def test_a_growing_rtt_retreats() -> None:
    r = _jumped()
    for _ in range(cr.QUEUE_SAMPLES - 1):
        assert r.on_rtt(0.11, 0.05) is None
    assert r.on_rtt(0.051, 0.05) is None  # an empty-queue sample resets the count
    phases = [r.on_rtt(0.11, 0.05) for _ in range(cr.QUEUE_SAMPLES)]
    assert phases[-1] == cr.RETREAT and "queue" in r.reason


@pytest.mark.parametrize("rtt", [0.02, 0.2])
def test_a_first_rtt_unlike_the_stored_one_means_no_jump(rtt: float) -> None:
    r = cr.CarefulResume(1e6, 0.05)
    assert r.on_rtt(rtt, rtt) == cr.NORMAL
    assert not r.active and not r.validated and "stored" in r.reason
    assert r.on_sent(MSS, 0, MSS) is None and r.on_lost(10) is None  # stays cold


def test_persistent_congestion_before_validation_retreats() -> None:
    r = _jumped()
    assert r.on_persistent_congestion() == cr.RETREAT


def test_nonsense_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        cr.CarefulResume(0.0, 0.05)
    with pytest.raises(ValueError):
        cr.CarefulResume(1e6, float("nan"))


def test_the_first_connection_jumps_at_the_whole_rate_the_others_at_what_is_left() -> None:
    assert cr.jump_rate(1e6, []) == 1e6  # nothing up yet: the whole stored rate
    assert cr.jump_rate(1e6, [4e5]) == 6e5
    assert cr.jump_rate(1e6, [4e5, 5.5e5]) == 0.0  # under MIN_SHARE left: start cold
    assert cr.jump_rate(1e6, [1e6, 2e5]) == 0.0  # the path is taken: never above the stored
    assert cr.jump_rate(0.0, []) == 0.0


def test_a_connection_commits_its_jump_rate_from_the_start_until_the_resume_is_decided() -> None:
    from dwcp.transport.bbr import BbrCongestionControl

    cc = BbrCongestionControl(max_datagram_size=MSS)
    assert cc.committed_rate == 0.0  # cold, no model yet
    cc.careful_resume(1e6, 0.05)
    assert cc.committed_rate == 1e6  # still in reconnaissance: the jump is promised
    assert cc.resume is not None
    cc.resume.on_rtt(0.2, 0.2)  # another path: no jump
    assert cc.committed_rate == 0.0
