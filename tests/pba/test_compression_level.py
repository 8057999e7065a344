"""The adaptive zstd level (PBA): up while the network is the bottleneck, down while the CPU is."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dwcp.delta import decode_frame, encode
from dwcp.pba.compression import MAX_LEVEL, AdaptiveLevel


def _feed(c: AdaptiveLevel, frames: int, busy: float, interval: float) -> None:
    for _ in range(frames):
        c.observe(busy, interval)


def test_a_slow_network_raises_the_level_to_the_ceiling() -> None:
    c = AdaptiveLevel(3)
    _feed(c, 1 + 4 * 20, busy=0.005, interval=0.03)  # encoder idle 80% of the time
    assert c.level == MAX_LEVEL
    assert c.history[:3] == [4, 5, 6]  # one step per window, never a jump


def test_a_busy_encoder_lowers_the_level_to_the_floor() -> None:
    c = AdaptiveLevel(6, lo=1)
    _feed(c, 1 + 4 * 10, busy=0.03, interval=0.031)
    assert c.level == 1


def test_a_balanced_pipeline_holds_its_level() -> None:
    c = AdaptiveLevel(5)
    _feed(c, 1 + 4 * 10, busy=0.02, interval=0.035)  # ~57% busy: inside the band
    assert c.level == 5 and set(c.history) == {5}


def test_the_first_frame_does_not_count() -> None:
    c = AdaptiveLevel(5, window=1)
    c.observe(0.0, 10.0)  # the pipeline filling: the sender waited for the first frame
    assert c.level == 5 and c.history == []
    c.observe(0.0, 0.1)
    assert c.level == 6


def test_the_start_is_clamped_and_an_empty_range_refused() -> None:
    assert AdaptiveLevel(19).level == MAX_LEVEL
    assert AdaptiveLevel(-3, lo=-3).level == -3
    with pytest.raises(ValueError):
        AdaptiveLevel(3, lo=5, hi=4)


def test_frames_of_changing_levels_decode(tmp_path: Path) -> None:
    rng = random.Random(2)
    data = b"".join(rng.choice([b"a" * 4096, rng.randbytes(4096)]) for _ in range(600))
    img = tmp_path / "img"
    img.write_bytes(data)
    levels = iter(range(1, 100))
    frames = list(encode(img, [(0, len(data))], level=lambda: next(levels), batch_bytes=256 * 1024))
    assert len(frames) > 5
    assert [frame[3] for frame in frames] == list(range(1, len(frames) + 1))  # header level
    out = bytearray(len(data))
    for frame in frames:
        for piece in decode_frame(frame):
            out[piece.offset : piece.offset + len(piece.data)] = piece.data
    assert bytes(out) == data


def test_a_busy_host_holds_the_level_even_when_the_encoder_idles() -> None:
    """The sender's QUIC stack may be the bottleneck: compressing more would steal its CPU."""
    c = AdaptiveLevel(3)
    for _ in range(1 + 4 * 10):
        c.observe(0.005, 0.03, host_idle=0.1)
    assert c.level == 3
    for _ in range(4):
        c.observe(0.005, 0.03, host_idle=0.5)
    assert c.level == 4
