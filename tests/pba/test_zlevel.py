"""The starting zstd level (PBA): chosen from the predicted rate and a sample of the data."""

from __future__ import annotations

import random

import pytest

from dwcp.errors import UsageError
from dwcp.pba.zlevel import LevelCost, choose_level, measure_levels, sample

COSTS = [  # the shape of delta-engine.md's figures: higher levels slower, smaller
    LevelCost(1, 500e6, 2.4),
    LevelCost(3, 340e6, 2.7),
    LevelCost(6, 90e6, 2.9),
    LevelCost(9, 40e6, 3.0),
]


def test_a_slow_link_gets_the_smallest_output() -> None:
    c = choose_level(COSTS, 10e6)
    assert (c.level, c.bound) == (9, "link")


def test_a_fast_link_gets_the_level_the_cpu_keeps_up_with() -> None:
    assert choose_level(COSTS, 10e9).level == 1
    assert choose_level(COSTS, 1e9).level == 3  # L3 343 MB/s x 2.7 beats L1's 125 MB/s x 2.4


def test_the_senders_cpu_makes_a_fast_link_prefer_fewer_bytes() -> None:
    free = choose_level(COSTS, 10e9)
    busy = choose_level(COSTS, 10e9, send_cpu_s_per_byte=43e-9)  # pure-Python QUIC
    assert busy.bound == "send" and busy.level > free.level


def test_incompressible_data_gets_the_fastest_level() -> None:
    flat = [LevelCost(level, 400e6 / level, 1.0) for level in range(1, 10)]
    assert choose_level(flat, 10e6).level == 1


def test_measured_costs_follow_the_data() -> None:
    rnd = random.Random(1).randbytes(1 << 20)
    zeros = bytes(1 << 20)
    r = measure_levels(sample(rnd), levels=(1, 3))
    z = measure_levels(sample(zeros), levels=(1, 3))
    assert all(c.ratio < 1.01 for c in r) and all(c.ratio > 100 for c in z)
    assert all(c.speed_Bps > 0 for c in r + z)


def test_a_sample_takes_evenly_spaced_pieces() -> None:
    data = bytes(range(256)) * 4096 * 4  # 4 MiB
    s = sample(data, pieces=4, size=1024)
    assert len(s) == 4096
    assert s[:1024] == data[:1024] and s[-1024:] == data[-1024:]
    assert sample(b"abc") == b"abc"


def test_no_rate_or_no_levels_is_refused() -> None:
    with pytest.raises(UsageError, match="predict"):
        choose_level(COSTS, 0)
    with pytest.raises(UsageError, match="no compression levels"):
        choose_level([], 1e6)
