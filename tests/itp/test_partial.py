"""Pulls from sources that hold different parts, the equal split, and the whole-file hash."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from dwcp.itp import bound
from dwcp.migrate.multi import build_manifest, pull
from dwcp.migrate.pieces import agree
from tests.itp.test_multi import PIECE, FakeSources, _image, _place, _sha


class ByShaSources(FakeSources):
    """Also answers a manifest asked by SHA-256, as the node does."""

    async def manifest(self, source: str, name: str, piece: int) -> bytes:
        path = self.files[source]
        m = build_manifest(path, path.name, PIECE)
        if name not in (path.name, m.sha256):
            raise FileNotFoundError(f"{source} has no {name}")
        return m.to_json()


def _versions(tmp_path: Path) -> tuple[Path, Path]:
    """A new image and an older version of it: the same but for its last quarter."""
    new = _image(tmp_path / "img", 40 * PIECE + 1234, 1)
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    old = old_dir / "img"
    data = bytearray(new.read_bytes())
    data[30 * PIECE :] = random.Random(9).randbytes(len(data) - 30 * PIECE)
    old.write_bytes(bytes(data))
    return new, old


def test_older_versions_lend_the_pieces_they_share(tmp_path: Path) -> None:
    new, old = _versions(tmp_path)
    src = ByShaSources({"full": new, "o1": old, "o2": old}, {"full": 0.004, "o1": 0.001,
                       "o2": 0.001})  # fmt: skip
    want = build_manifest(new, "img", PIECE).sha256
    r = asyncio.run(pull(src, ["full", "o1", "o2"], want, _place(tmp_path)))
    assert _sha(tmp_path / "out" / "img") == _sha(new)
    assert r.sources["o1"]["bytes"] + r.sources["o2"]["bytes"] > 0
    assert r.sources["full"]["bytes"] >= 10 * PIECE  # the last quarter only it holds
    assert r.sources["o1"]["state"] == "live"
    assert r.rejected_bytes == 0


def test_the_bound_counts_what_only_some_hold(tmp_path: Path) -> None:
    new, old = _versions(tmp_path)
    src = ByShaSources({"full": new, "o1": old}, {"full": 0.0, "o1": 0.0})
    want = build_manifest(new, "img", PIECE).sha256
    ag = asyncio.run(agree(src, ["full", "o1"], want, PIECE))
    assert ag.holders == ["full"] and list(ag.partial) == ["o1"]
    assert ag.pieces_of("o1") == frozenset(range(30))
    pieces = [(i, min(PIECE, ag.manifest.size - i * PIECE)) for i in range(41)]
    groups = dict((hs, b) for b, hs in ag.groups(pieces))
    assert groups[frozenset({"full", "o1"})] == 30 * PIECE
    assert groups[frozenset({"full"})] == ag.manifest.size - 30 * PIECE
    # full alone must carry the tail: the bound is its time, not the pooled rate's.
    t = bound(ag.groups(pieces), {"full": 1e6, "o1": 9e6})
    assert abs(t - groups[frozenset({"full"})] / 1e6) < 1e-9


def test_equal_split_gives_each_source_one_equal_run(tmp_path: Path) -> None:
    img = _image(tmp_path / "img", 40 * PIECE, 1)
    src = FakeSources({"a": img, "b": img}, {"a": 0.001, "b": 0.008})
    r = asyncio.run(pull(src, ["a", "b"], "img", _place(tmp_path), equal_split=True))
    assert _sha(tmp_path / "out" / "img") == _sha(img)
    # The fast source does not help the slow one: that is what makes it naive.
    assert r.sources["a"]["bytes"] == r.sources["b"]["bytes"] == 20 * PIECE
    assert r.duplicate_bytes == 0


def test_equal_split_leaves_partial_holders_out(tmp_path: Path) -> None:
    new, old = _versions(tmp_path)
    src = ByShaSources({"full": new, "o1": old}, {"full": 0.0, "o1": 0.0})
    want = build_manifest(new, "img", PIECE).sha256
    r = asyncio.run(pull(src, ["full", "o1"], want, _place(tmp_path), equal_split=True))
    assert _sha(tmp_path / "out" / "img") == _sha(new)
    assert "o1" in r.excluded and "o1" not in r.sources


def test_whole_hash_past_the_reorder_window(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Pieces past the in-memory window are read back for the whole-file hash."""
    monkeypatch.setattr("dwcp.migrate.multi.REORDER", PIECE)
    img = _image(tmp_path / "img", 40 * PIECE + 7, 3)
    src = FakeSources({"a": img, "b": img, "c": img}, {"a": 0.001, "b": 0.003, "c": 0.009})
    r = asyncio.run(pull(src, ["a", "b", "c"], "img", _place(tmp_path)))
    assert _sha(tmp_path / "out" / "img") == _sha(img) == r.sha256
    assert set(r.phases) == {"agree", "pieces", "finish"}


def test_the_measured_bound_leaves_a_liar_out(tmp_path: Path) -> None:
    """A source whose bytes were all rejected gave no capacity: T* is the honest ones'."""
    img = _image(tmp_path / "img", 40 * PIECE, 4)
    src = FakeSources({"s0": img, "s1": img, "s2": img}, {"s0": 0.001, "s1": 0.002, "s2": 0.004})
    src.liar = "s0"
    r = asyncio.run(pull(src, ["s0", "s1", "s2"], "img", _place(tmp_path)))
    assert r.sources["s0"]["state"] == "excluded" and r.sources["s0"]["rate"] > 0
    honest = {s: float(v["rate"]) for s, v in r.sources.items() if s != "s0"}
    want = bound([(img.stat().st_size, frozenset(honest))], honest)
    assert r.bound_seconds is not None
    assert abs(r.bound_seconds - want) <= 1e-3 * want
