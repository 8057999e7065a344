"""The background copy-and-verify pass: started early, stopped, resumed, failing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dwcp.delta import ImageIndex, Rebuilder, encode, finisher, plan, scan_image
from dwcp.errors import ImageError, IntegrityError, LocalImageChangedError
from tests.delta.conftest import BS, finish_from, old_and_new


@pytest.fixture(autouse=True)
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many windows on a small image, so the waits between them are exercised."""
    monkeypatch.setattr(finisher, "WINDOW", 16 * BS)


def _setup(tmp_path: Path, blocks: int = 700) -> tuple[Path, Path, ImageIndex]:
    return old_and_new(tmp_path, blocks=blocks, seed=5, changed=4, tail=1000)


def test_started_early_the_image_is_rebuilt_whatever_the_order(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    assert p.bytes_local and p.bytes_zero and p.bytes_missing
    frames = list(encode(src, p.missing, batch_bytes=32 * 1024))
    random.Random(1).shuffle(frames)
    rb = Rebuilder.for_manifest(m, p, out)
    rb.start()
    rb.start()  # idempotent
    for f in frames:
        rb.feed(f)
    assert rb.finish() == out
    assert out.read_bytes() == src.read_bytes()


def test_close_while_waiting_for_data_then_resume(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    frames = list(encode(src, p.missing, batch_bytes=32 * 1024))
    rb = Rebuilder.for_manifest(m, p, out)
    rb.start()
    for f in frames[: len(frames) // 2]:
        rb.feed(f)
    rb.close()  # the pass is waiting for a window's data: close must not hang
    assert not out.exists()
    rb2 = Rebuilder.for_manifest(m, p, out)
    rb2.start()
    finish_from(rb2, src, out)


def test_base_changed_after_planning_keeps_what_was_received(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    base = tmp_path / "images" / "old.img"
    copy = next(e for e in p.extents if e.kind == "copy")
    with open(base, "r+b") as f:
        f.seek(copy.source_offset)
        f.write(b"\xff" * 16)
    rb = Rebuilder.for_manifest(m, p, out)
    rb.start()
    for f_ in encode(src, p.missing):
        rb.feed(f_)
    with pytest.raises(LocalImageChangedError, match="changed since it was indexed"):
        rb.finish()
    assert not out.exists()
    index.update(base)
    rb2 = Rebuilder.for_manifest(m, plan(m, index.local), out)
    assert 0 < rb2.bytes_pending <= BS  # only the block the base lost
    finish_from(rb2, src, out)


def test_base_removed_after_planning_is_an_image_error(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    (tmp_path / "images" / "old.img").unlink()
    rb = Rebuilder.for_manifest(m, p, out)
    rb.start()
    for f_ in encode(src, p.missing):
        rb.feed(f_)
    with pytest.raises(ImageError, match="is gone"):
        rb.finish()
    assert not out.exists()
    rb.close()


def test_wrong_sha256_is_refused_and_nothing_published(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    rb = Rebuilder(size=m.size, sha256=bytes(32), plan=p, out_path=out)  # no manifest
    rb.start()
    for f_ in encode(src, p.missing):
        rb.feed(f_)
    with pytest.raises(IntegrityError, match="SHA-256"):
        rb.finish()
    assert not out.exists()
