from __future__ import annotations

import random
from pathlib import Path

import pytest

from dwcp.delta import ImageIndex, Rebuilder, encode

BS = 4096


def make_image(rng: random.Random, blocks: int, zero_ratio: float = 0.3) -> bytearray:
    """Blocks of random data and zeros, with some repeated content like a file system."""
    out = bytearray()
    pool = [rng.randbytes(BS) for _ in range(8)]
    for _ in range(blocks):
        r = rng.random()
        if r < zero_ratio:
            out += bytes(BS)
        elif r < zero_ratio + 0.1:
            out += rng.choice(pool)
        else:
            out += rng.randbytes(BS)
    return out


def old_and_new(
    tmp_path: Path, *, blocks: int, seed: int, changed: int, tail: int = 0
) -> tuple[Path, Path, ImageIndex]:
    """An indexed ``images/old.img``, a source ``src.img`` with 1/``changed`` of its
    blocks rewritten (plus ``tail`` bytes), and where the rebuilt image should go."""
    rng = random.Random(seed)
    old = make_image(rng, blocks)
    new = bytearray(old)
    for i in rng.sample(range(blocks), blocks // changed):
        new[i * BS : (i + 1) * BS] = rng.randbytes(BS)
    new += rng.randbytes(tail)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "old.img").write_bytes(old)
    (tmp_path / "src.img").write_bytes(new)
    index = ImageIndex(tmp_path / "index.db")
    index.sync_dir(tmp_path / "images")
    return tmp_path / "src.img", tmp_path / "images" / "new.img", index


def finish_from(rb: Rebuilder, src: Path, out: Path) -> None:
    """Send ``rb`` what it still lacks from ``src``, finish it, and check ``out`` is ``src``."""
    for frame in encode(src, rb.pending()):
        rb.feed(frame)
    rb.finish()
    assert out.read_bytes() == src.read_bytes()


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def write(tmp_path: Path):  # type: ignore[no-untyped-def]
    def _write(name: str, data: bytes | bytearray) -> Path:
        p = tmp_path / name
        p.write_bytes(bytes(data))
        return p

    return _write
