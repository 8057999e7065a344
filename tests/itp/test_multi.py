"""The multi-source pull engine against in-process fake sources (real asyncio, no network)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path

import pytest

from dwcp.errors import ImageError, TransportError
from dwcp.migrate.multi import PieceManifest, build_manifest, pull, read_piece, resumable

PIECE = 64 * 1024


class FakeSources:
    """Sources serving files; ``liar`` flips bytes, ``dead`` fails after ``die_after`` pieces."""

    def __init__(self, files: dict[str, Path], delay: dict[str, float]) -> None:
        self.files = files
        self.delay = delay
        self.liar: str | None = None
        self.dead: str | None = None
        self.die_after = 0
        self.served: dict[str, int] = dict.fromkeys(files, 0)

    async def manifest(self, source: str, name: str, piece: int) -> bytes:
        path = self.files[source]
        if path.name != name:
            raise ImageError(f"{source} has no {name}")
        return build_manifest(path, name, PIECE).to_json()

    async def piece(self, source: str, sha256: str, offset: int, size: int) -> bytes:
        await asyncio.sleep(self.delay[source])
        if source == self.dead and self.served[source] >= self.die_after:
            await asyncio.sleep(0.05)
            raise TransportError(f"{source} is gone")
        self.served[source] += 1
        data = read_piece(self.files[source], offset, size)
        if source == self.liar:
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        return data


def _image(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def _setup(tmp_path: Path, n: int = 3) -> tuple[FakeSources, Path]:
    img = _image(tmp_path / "img", 40 * PIECE + 1234, 1)
    files = {f"s{i}": img for i in range(n)}
    return FakeSources(files, {f"s{i}": 0.002 * (i + 1) for i in range(n)}), img


def _place(tmp_path: Path):  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)

    def place(m: PieceManifest) -> tuple[Path, Path]:
        return out / "img", tmp_path / "partial" / m.sha256[:32]

    return place


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_three_sources_byte_identical_and_shared(tmp_path: Path) -> None:
    src, img = _setup(tmp_path)
    r = asyncio.run(pull(src, ["s0", "s1", "s2"], "img", _place(tmp_path)))
    assert _sha(tmp_path / "out" / "img") == _sha(img) == r.sha256
    assert all(v["bytes"] > 0 for v in r.sources.values())
    assert sum(v["bytes"] for v in r.sources.values()) == img.stat().st_size
    assert r.bound_seconds is not None and r.bound_seconds > 0
    assert not (tmp_path / "partial" / r.sha256[:32] / "data").exists()


def test_a_lying_source_is_excluded_and_the_result_is_correct(tmp_path: Path) -> None:
    src, img = _setup(tmp_path)
    src.liar = "s0"
    r = asyncio.run(pull(src, ["s0", "s1", "s2"], "img", _place(tmp_path)))
    assert _sha(tmp_path / "out" / "img") == _sha(img)
    assert r.sources["s0"]["state"] == "excluded"
    assert "s0" in r.excluded
    assert r.rejected_bytes > 0


def test_a_source_that_dies_has_its_work_moved(tmp_path: Path) -> None:
    src, img = _setup(tmp_path)
    src.dead, src.die_after = "s0", 3
    r = asyncio.run(pull(src, ["s0", "s1", "s2"], "img", _place(tmp_path)))
    assert _sha(tmp_path / "out" / "img") == _sha(img)
    assert r.sources["s0"]["state"] == "dead"


def test_a_source_with_a_different_image_is_outvoted(tmp_path: Path) -> None:
    src, img = _setup(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    src.files["s2"] = _image(other / "img", 40 * PIECE, 2)
    r = asyncio.run(pull(src, ["s0", "s1", "s2"], "img", _place(tmp_path)))
    assert _sha(tmp_path / "out" / "img") == _sha(img)
    assert "different image" in r.excluded["s2"]
    assert "s2" not in r.sources


def test_an_interrupted_pull_resumes_from_its_pieces(tmp_path: Path) -> None:
    src, img = _setup(tmp_path)

    async def interrupted() -> None:
        task = asyncio.ensure_future(pull(src, ["s0", "s1", "s2"], "img", _place(tmp_path)))
        while sum(src.served.values()) < 20:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    assert not (tmp_path / "out" / "img").exists()
    m = build_manifest(img, "img", PIECE)
    done = resumable(tmp_path / "partial" / m.sha256[:32], m)  # what --dry-run reports
    r = asyncio.run(pull(src, ["s0", "s1", "s2"], "img", _place(tmp_path)))
    assert _sha(tmp_path / "out" / "img") == _sha(img)
    assert r.bytes_resumed >= 10 * PIECE
    assert r.bytes_resumed == sum(min(PIECE, m.size - i * PIECE) for i in done)


def test_nobody_holds_it(tmp_path: Path) -> None:
    src, _ = _setup(tmp_path)
    with pytest.raises(ImageError, match="no source holds"):
        asyncio.run(pull(src, ["s0", "s1"], "nope", _place(tmp_path)))


def test_malformed_manifests_are_errors_not_crashes() -> None:
    from dwcp.errors import ManifestError

    for raw in (b"", b"{}", b"[1]", b'{"name":1,"size":-1,"sha256":"x","piece":0,"hashes":[]}'):
        with pytest.raises(ManifestError):
            PieceManifest.from_json(raw)
