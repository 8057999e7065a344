"""Sparse images: holes read as zeros from memory give the same bytes and manifest."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from dwcp.delta import content_id, image_sha256, scan_image
from dwcp.delta.reader import ImageReader
from dwcp.errors import ImageError


def _sparse_and_dense(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(3)
    size = 9 * 1024 * 1024 + 123
    sparse, dense = tmp_path / "sparse.img", tmp_path / "dense.img"
    content = bytearray(size)
    with open(sparse, "wb") as f:
        f.truncate(size)
        for _ in range(12):  # data islands at unaligned places, some touching the end
            off = rng.randrange(0, size - 1)
            data = rng.randbytes(min(rng.randrange(1, 300_000), size - off))
            f.seek(off)
            f.write(data)
            content[off : off + len(data)] = data
    dense.write_bytes(content)
    return sparse, dense


def test_reads_across_holes_match_a_dense_copy(tmp_path: Path) -> None:
    sparse, dense = _sparse_and_dense(tmp_path)
    want = dense.read_bytes()
    rng = random.Random(4)
    with ImageReader(sparse) as r:
        for _ in range(200):
            off = rng.randrange(0, r.size)
            n = rng.randrange(1, min(r.size - off, 2_000_000) + 1)
            assert r.read(off, n) == want[off : off + n]


def test_manifest_of_a_sparse_image_equals_the_dense_one(tmp_path: Path) -> None:
    sparse, dense = _sparse_and_dense(tmp_path)
    a, b = scan_image(sparse), scan_image(dense)
    assert (a.sha256, a.runs, a.fps) == (b.sha256, b.runs, b.fps)
    assert a.dense() == b.dense() and a.root == b.root


def test_an_all_hole_image(tmp_path: Path) -> None:
    p = tmp_path / "empty.img"
    with open(p, "wb") as f:
        f.truncate(5 * 1024 * 1024)
    with ImageReader(p) as r:
        assert r.read(0, r.size) == bytes(r.size)
    assert scan_image(p).sha256 == scan_image(_dense_zeros(tmp_path, 5 * 1024 * 1024)).sha256


def _dense_zeros(tmp_path: Path, size: int) -> Path:
    p = tmp_path / "zeros.img"
    with open(p, "wb") as f:
        f.write(bytes(size))
        os.fsync(f.fileno())
    return p


def test_image_sha256_and_content_id(tmp_path: Path) -> None:
    sparse, dense = _sparse_and_dense(tmp_path)
    m = scan_image(sparse, digest=False)
    assert image_sha256(sparse, m.stat_key) == hashlib.sha256(dense.read_bytes()).digest()
    assert content_id(m) == content_id(scan_image(dense, digest=False))
    with open(sparse, "ab") as f:  # the image moves on after it was fingerprinted
        f.write(b"x")
    with pytest.raises(ImageError, match="changed"):
        image_sha256(sparse, m.stat_key)
    assert content_id(scan_image(sparse, digest=False)) != content_id(m)


def test_image_sha256_stops_when_asked(tmp_path: Path) -> None:
    sparse, _ = _sparse_and_dense(tmp_path)
    stop = threading.Event()
    stop.set()
    with pytest.raises(ImageError, match="stopped"):
        image_sha256(sparse, None, stop)
