"""A migration's ETA from the path's prediction (PBA, issue 14)."""

from __future__ import annotations

import pytest

from dwcp.pba.eta import MigrationEta
from dwcp.pba.predictor import Predictor


def test_an_unknown_path_predicts_nothing_until_bytes_flow() -> None:
    e = MigrationEta(None)
    assert e.remaining(1.0, 100, 0, 0) is None  # not sending yet
    assert e.start(0.5, 8_000_000) is None
    assert e.remaining(1.0, 8_000_000, 0, 0) is None
    # 1 MB sent as 0.5 MB of wire bytes in 0.5 s: 8 Mbit/s, 7 MB left -> 3.5 MB -> 3.5 s
    assert e.remaining(1.0, 8_000_000, 1_000_000, 500_000) == pytest.approx(3.5)


def test_a_known_path_predicts_before_data_flows_and_blends_in_its_own_rate() -> None:
    e = MigrationEta(Predictor([80e6] * 60))
    assert e.start(2.0, 100_000_000) == pytest.approx(12.0)  # 2 s scanning + 800 Mbit at 80
    assert e.predicted_seconds == pytest.approx(12.0)
    assert e.remaining(2.0, 100_000_000, 0, 0) == pytest.approx(10.0)
    # this transfer runs at 40 Mbit/s: after 5 s the estimate is halfway between the rates
    r = e.remaining(7.0, 100_000_000, 25_000_000, 25_000_000)
    assert r == pytest.approx(75_000_000 * 8 / 60e6)
