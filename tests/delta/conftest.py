from __future__ import annotations

import random
from pathlib import Path

import pytest

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
