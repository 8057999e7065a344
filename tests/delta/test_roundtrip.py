"""Delta round trips: whatever the edit, patch(delta(new, old), old) == new."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp.delta import LocalIndex, apply_delta, chunk_list, make_delta, plan, refine, scan_image
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


def test_summary_exchange_costs_metadata_in_proportion_to_the_change(
    tmp_path: Path, rng: random.Random
) -> None:
    from dwcp.delta.summary import ManifestAssembler, leaves_bytes, summary_bytes

    old = make_image(rng, 256 * 40 + 17)  # 40 full 1 MiB groups and a partial one
    new = bytearray(old)
    for g in (3, 17):  # change two groups only
        new[g * 256 * BS + 5 * BS] ^= 0xFF
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    index = LocalIndex.of_files([tmp_path / "old"])
    m = scan_image(tmp_path / "new")
    asm = ManifestAssembler(summary_bytes(m), index)
    assert asm.needed == [3, 17]
    leaves = leaves_bytes(m, asm.needed)
    assert len(leaves) < 2 * 256 * 16 + 200
    assert asm.complete(leaves) == m
    bad = bytearray(leaves)
    bad[-1] ^= 1
    import pytest

    from dwcp.errors import ManifestError

    with pytest.raises(ManifestError, match="tree root"):
        ManifestAssembler(summary_bytes(m), index).complete(bytes(bad))
    with pytest.raises(ManifestError):
        ManifestAssembler(summary_bytes(m)[:-1], index)
