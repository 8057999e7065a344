"""The migrate source starts at the level the predicted link and a sample of the image pick."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from pathlib import Path

import pytest

from dwcp import migrate as aio
from dwcp.identity import NodeKey
from dwcp.migrate import source
from dwcp.pba.compression import AdaptiveLevel
from dwcp.pba.zlevel import LevelChoice, read_sample, sample, start_level
from tests.node.test_glue import Dest, pair

MiB = 1 << 20


def _zeroish(path: Path, size: int) -> None:
    """Text-like data: words of a random vocabulary, which higher levels shrink further."""
    rng = random.Random(1)
    words = [bytes(rng.choices(b"abcdefghijklmnop", k=rng.randint(2, 9))) for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=512)) + b"\n"
    path.write_bytes(bytes(out[:size]))


def test_a_files_sample_is_the_same_as_the_bytes_sample(tmp_path: Path) -> None:
    data = os.urandom(9 * MiB + 123)
    p = tmp_path / "img"
    p.write_bytes(data)
    assert read_sample(p) == sample(data)
    small = tmp_path / "small"
    small.write_bytes(data[:1000])
    assert read_sample(small) == data[:1000]


def test_the_sample_leaves_out_zero_blocks(tmp_path: Path) -> None:
    """An image half holes (zero blocks, sent as such) is sampled for its data only."""
    rng = random.Random(2)
    blocks = [rng.randbytes(4096) if i % 2 else bytes(4096) for i in range(16 * 256)]
    p = tmp_path / "half.img"
    p.write_bytes(b"".join(blocks))
    got = read_sample(p)
    assert len(got) >= 2 * MiB and len(got) % 4096 == 0
    assert all(got[i : i + 4096] != bytes(4096) for i in range(0, len(got), 4096))
    empty = tmp_path / "zeros.img"
    empty.write_bytes(bytes(16 * MiB))
    assert read_sample(empty) == b""


def test_the_start_follows_the_data_and_the_link(tmp_path: Path) -> None:
    z = tmp_path / "z"
    _zeroish(z, 8 * MiB)
    r = tmp_path / "r"
    r.write_bytes(os.urandom(8 * MiB))
    slow_zero = start_level(z, 10e6)
    fast_random = start_level(r, 10e9, send_cpu_s_per_byte=0.0)
    assert slow_zero.bound == "link" and slow_zero.level >= 5
    assert fast_random.level <= 2


def test_a_migration_with_a_predicted_rate_starts_at_the_chosen_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "vm.img"
    _zeroish(src, 8 * MiB)
    asked: list[tuple[Path, float, int | None]] = []

    def fake(path: Path, rate_bps: float, *, nbytes: int | None = None) -> LevelChoice:
        asked.append((path, rate_bps, nbytes))
        return LevelChoice(7, 1.0, "link", ())

    monkeypatch.setattr(source, "start_level", fake)

    async def main() -> None:
        dest = Dest(tmp_path / "dest")
        await dest.index.open(dest.store.images_dir)
        s, r = pair(False)
        key = NodeKey.generate()
        level = AdaptiveLevel(3, lo=1, hi=9, predicted_bps=10e6)
        send = aio.send_image(s, key, src, name="vm.img", peer="b", level=level)
        res = await asyncio.gather(send, aio.receive_image(r, key.public, dest.hooks()))
        await dest.index.close()
        assert asked == [(src, 10e6, 8 * MiB)]
        assert level.history[0] == 7
        got = dest.store.images_dir / "vm.img"
        assert (
            hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
        )
        assert res[0] is not None

    asyncio.run(main())


def test_a_failed_level_choice_keeps_the_configured_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choice runs beside the transfer: when it fails (an all-zero sample, a read
    error) the migration still completes, at the level it started with."""
    src = tmp_path / "vm.img"
    _zeroish(src, 4 * MiB)

    def broken(path: Path, rate_bps: float, *, nbytes: int | None = None) -> LevelChoice:
        raise OSError("sample unreadable")

    monkeypatch.setattr(source, "start_level", broken)

    async def main() -> None:
        dest = Dest(tmp_path / "dest")
        await dest.index.open(dest.store.images_dir)
        s, r = pair(False)
        key = NodeKey.generate()
        level = AdaptiveLevel(3, lo=1, hi=9, predicted_bps=10e6)
        send = aio.send_image(s, key, src, name="vm.img", peer="b", level=level)
        res = await asyncio.gather(send, aio.receive_image(r, key.public, dest.hooks()))
        await dest.index.close()
        assert level.level == 3  # 4 frames: fewer than one window of the controller
        got = dest.store.images_dir / "vm.img"
        assert got.read_bytes() == src.read_bytes()
        assert res[0] is not None

    asyncio.run(main())
