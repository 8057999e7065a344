"""Delta round trips: whatever the edit, patch(delta(new, old), old) == new."""

from __future__ import annotations

import hashlib
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp.delta import (
    LocalIndex,
    Manifest,
    ManifestAssembler,
    SummaryHeader,
    apply_delta,
    chunk_list,
    leaves_parts,
    make_delta,
    plan,
    refine,
    scan_image,
    summary_parts,
    with_sha256,
)
from dwcp.errors import ManifestError
from tests.delta.conftest import BS, make_image

edits = st.lists(
    st.tuples(
        st.sampled_from(["overwrite", "insert", "delete", "zero", "truncate", "append"]),
        st.floats(0, 1),
        st.integers(1, 3 * BS),
    ),
    max_size=6,
)


def apply_edits(data: bytearray, ops: list[tuple[str, float, int]], rng: random.Random) -> bytes:
    for kind, where, n in ops:
        pos = int(where * len(data))
        if kind == "overwrite":
            data[pos : pos + n] = rng.randbytes(len(data[pos : pos + n]))
        elif kind == "insert":
            data[pos:pos] = rng.randbytes(n)
        elif kind == "delete":
            del data[pos : pos + n]
        elif kind == "zero":
            data[pos : pos + n] = bytes(len(data[pos : pos + n]))
        elif kind == "truncate":
            del data[pos:]
        else:
            data += rng.randbytes(n)
    return bytes(data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), blocks=st.integers(0, 64), ops=edits)
def test_roundtrip_random_edits(seed: int, blocks: int, ops: list[tuple[str, float, int]]) -> None:
    rng = random.Random(seed)
    old = make_image(rng, blocks)
    new = apply_edits(bytearray(old), ops, rng)
    with tempfile.TemporaryDirectory() as d:
        dp = Path(d)
        (dp / "old").write_bytes(old)
        (dp / "new").write_bytes(new)
        st_ = make_delta(dp / "new", [dp / "old"], dp / "d")
        assert st_.bytes_image == len(new)
        apply_delta(dp / "d", [dp / "old"], dp / "out")
        assert (dp / "out").read_bytes() == new
        assert not [p for p in dp.iterdir() if p.name.startswith(".")]


def test_identical_image_sends_nothing(tmp_path: Path, rng: random.Random) -> None:
    img = tmp_path / "a"
    img.write_bytes(make_image(rng, 300))
    st_ = make_delta(img, [img], tmp_path / "d")
    assert st_.bytes_changed == 0
    assert st_.bytes_written < 4096


def test_scattered_writes_send_about_what_changed(tmp_path: Path, rng: random.Random) -> None:
    old = make_image(rng, 1000, zero_ratio=0.1)
    new = bytearray(old)
    changed = rng.sample(range(1000), 50)
    for i in changed:
        new[i * BS : (i + 1) * BS] = rng.randbytes(BS)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    st_ = make_delta(tmp_path / "new", [tmp_path / "old"], tmp_path / "d")
    assert st_.bytes_changed == 50 * BS
    assert st_.bytes_written < 50 * BS * 1.05 + 16 * 1024


def test_insert_near_start_is_found_by_cdc(tmp_path: Path, rng: random.Random) -> None:
    old = bytes(rng.randbytes(4 << 20))
    new = old[: 1 << 20] + b"1234567" + old[1 << 20 :]
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    m = scan_image(tmp_path / "new")
    index = LocalIndex.of_files([tmp_path / "old"])
    p = plan(m, index)
    assert p.bytes_missing > 2 << 20  # aligned matching alone misses everything after the insert
    p2 = refine(p, chunk_list(tmp_path / "new", p.missing), index)
    assert p2.bytes_missing < 200 * 1024  # a few chunks around the insert


def test_cross_image_dedup_with_several_bases(tmp_path: Path, rng: random.Random) -> None:
    a, b = make_image(rng, 200), make_image(rng, 200)
    new = bytes(b[: 100 * BS]) + bytes(a[50 * BS : 150 * BS])
    for name, data in (("a", a), ("b", b), ("new", new)):
        (tmp_path / name).write_bytes(data)
    st_ = make_delta(tmp_path / "new", [tmp_path / "a", tmp_path / "b"], tmp_path / "d")
    assert st_.bytes_changed == 0
    apply_delta(tmp_path / "d", [tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new


def _assembler(
    m: Manifest, index: LocalIndex, pieces: list[bytes], signed: list[bytes] | None = None
) -> ManifestAssembler:
    """An assembler fed ``pieces``; the offer signed the digest of ``signed`` (default:
    the same pieces)."""
    digest = hashlib.sha256(b"".join(pieces if signed is None else signed)).digest()
    asm = ManifestAssembler(SummaryHeader.of(m), index, summary_sha256=digest)
    for piece in pieces:
        asm.feed_summary(piece)
    asm.end_summary()
    return asm


def test_summary_exchange_costs_metadata_in_proportion_to_the_change(
    tmp_path: Path, rng: random.Random
) -> None:
    old = make_image(rng, 256 * 40 + 17)  # 40 full 1 MiB groups and a partial one
    new = bytearray(old)
    for g in (3, 17):  # change two groups only
        new[g * 256 * BS + 5 * BS] ^= 0xFF
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    index = LocalIndex.of_files([tmp_path / "old"])
    m = scan_image(tmp_path / "new")
    pieces = list(summary_parts(m, part_bytes=240))  # ten entries a piece
    assert len(pieces) == 5
    asm = _assembler(m, index, pieces)
    assert list(asm.needed) == [3, 17]
    assert list(asm.needed_runs()) == [(3, 1), (17, 1)]
    leaves = list(leaves_parts(m, list(asm.needed_runs())))
    assert sum(len(x) for x in leaves) < 2 * 256 * 16 + 200
    for piece in leaves:
        asm.feed_leaves(piece)
    assert with_sha256(asm.complete(), m.sha256) == m
    bad = bytearray(leaves[-1])
    bad[-1] ^= 1
    asm = _assembler(m, index, pieces)
    asm.feed_leaves(bytes(bad))
    with pytest.raises(ManifestError, match="tree root"):
        asm.complete()
    forged = bytearray(pieces[0])
    forged[10] ^= 1  # a parent changed in transit
    with pytest.raises(ManifestError, match="digest"):
        _assembler(m, index, [bytes(forged), *pieces[1:]], signed=pieces)
    with pytest.raises(ManifestError, match="entries"):
        _assembler(m, index, [pieces[0][:-24], *pieces[1:]])
    with pytest.raises(ManifestError, match="out of order"):
        _assembler(m, index, [pieces[1], pieces[0], *pieces[2:]])


def test_an_empty_disk_costs_one_summary_entry(tmp_path: Path) -> None:
    """A 1 TiB image of zeros: one summary entry, no leaves, a plan of one zero extent."""
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(1 << 40)
        f.seek(5 << 30)
        f.write(b"data" * 1024)
    m = scan_image(img, digest=False)
    assert (m.nonzero_blocks, m.n_runs, len(m.group_ids)) == (1, 1, 2)
    asm = _assembler(m, LocalIndex(), list(summary_parts(m)))
    assert list(asm.needed_runs()) == [((5 << 30) // (1 << 20), 1), ((1 << 20) - 1, 1)]
    for piece in leaves_parts(m, list(asm.needed_runs())):
        asm.feed_leaves(piece)
    got = asm.complete()
    assert got.root == m.root
    p = plan(got, LocalIndex())
    assert [e.kind for e in p.extents] == ["zero", "missing", "zero"]
    assert p.bytes_missing == 4096
