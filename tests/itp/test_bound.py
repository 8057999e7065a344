"""T*: the max-flow bound over source subsets, constant and time-varying."""

from __future__ import annotations

import math

import pytest

from dwcp.itp import RateProfile, bound, bound_profiles

AB = frozenset({"a", "b"})
A = frozenset({"a"})


def test_everyone_holds_everything_is_total_over_sum_of_rates() -> None:
    assert bound([(100, AB)], {"a": 10.0, "b": 40.0}) == pytest.approx(2.0)


def test_bytes_only_one_source_holds_bound_it() -> None:
    # 90 bytes only a holds at 10 B/s: 9 s, although a+b could move all 100 in 2 s.
    assert bound([(90, A), (10, AB)], {"a": 10.0, "b": 40.0}) == pytest.approx(9.0)


def test_receiver_link_bounds_too() -> None:
    assert bound([(100, AB)], {"a": 10.0, "b": 40.0}, recv_rate=20.0) == pytest.approx(5.0)


def test_chunk_without_holder_is_refused() -> None:
    with pytest.raises(ValueError, match="no holder"):
        bound([(1, frozenset())], {"a": 1.0})


def test_profiles_with_constant_rates_agree_with_bound() -> None:
    sizes = [(90, A), (10, AB)]
    profiles = {"a": RateProfile.constant(10.0), "b": RateProfile.constant(40.0)}
    assert bound_profiles(sizes, profiles) == pytest.approx(9.0, rel=1e-5)


def test_a_source_that_dies_leaves_the_rest_to_the_others() -> None:
    # b delivers 40 B/s for 1 s then dies: 40 bytes by b, 60 by a at 10 B/s: 6 s.
    profiles = {"a": RateProfile.constant(10.0), "b": RateProfile(((0, 40.0), (1, 0.0)))}
    assert bound_profiles([(100, AB)], profiles) == pytest.approx(6.0, rel=1e-5)


def test_nobody_able_to_deliver_is_infinite() -> None:
    profiles = {"a": RateProfile(((0, 1.0), (1, 0.0)))}
    assert bound_profiles([(100, A)], profiles, horizon=1000) == math.inf


def test_profile_integral() -> None:
    p = RateProfile(((0, 10.0), (2, 1.0)))
    assert p.integral(1) == 10
    assert p.integral(4) == 22
    assert p.at(3) == 1.0
