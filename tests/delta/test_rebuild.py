"""Receiver side: resume, verification, index persistence, disk full."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from dwcp.delta import ImageIndex, Rebuilder, encode, plan, scan_image
from dwcp.errors import (
    DiskFullError,
    ImageError,
    IntegrityError,
    LocalImageChangedError,
    ProtocolError,
)
from tests.delta.conftest import finish_from, make_image, old_and_new


def _setup(tmp_path: Path, blocks: int = 600) -> tuple[Path, Path, ImageIndex]:
    return old_and_new(tmp_path, blocks=blocks, seed=11, changed=3)


def test_resume_after_interruption(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    frames = list(encode(src, p.missing, batch_bytes=64 * 1024))
    assert len(frames) > 4
    rb = Rebuilder.for_manifest(m, p, out)
    for f in frames[: len(frames) // 2]:
        rb.feed(f)
    rb.close()  # the receiver stops (clean shutdown or crash after the last flush)
    assert not out.exists()
    rb2 = Rebuilder.for_manifest(m, p, out)
    left = rb2.pending()
    assert 0 < sum(n for _, n in left) < p.bytes_missing
    for f in encode(src, left, batch_bytes=64 * 1024):
        rb2.feed(f)
    rb2.finish()
    assert out.read_bytes() == src.read_bytes()
    assert not list(out.parent.glob(".*"))


def test_data_not_matching_manifest_is_refused(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    liar = tmp_path / "liar.img"
    data = bytearray(src.read_bytes())
    off = p.missing[0][0]
    data[off] ^= 1
    liar.write_bytes(data)
    rb = Rebuilder.for_manifest(m, p, out)
    with pytest.raises(IntegrityError, match="fingerprints"):
        for f in encode(liar, p.missing):
            rb.feed(f)
    rb.abort()
    assert not out.exists()


def test_unrequested_range_is_refused(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    local = next(e for e in p.extents if e.kind == "copy")
    rb = Rebuilder.for_manifest(m, p, out)
    with pytest.raises(ProtocolError, match="not asked for"):
        for f in encode(src, [(local.offset, local.length)]):
            rb.feed(f)
    rb.abort()


def test_base_changed_after_indexing_is_caught(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    base = tmp_path / "images" / "old.img"
    copy = next(e for e in p.extents if e.kind == "copy")
    with open(base, "r+b") as f:
        f.seek(copy.source_offset)
        f.write(b"\xff" * 16)
    rb = Rebuilder.for_manifest(m, p, out)
    for f_ in encode(src, p.missing):
        rb.feed(f_)
    with pytest.raises(LocalImageChangedError, match="changed since it was indexed"):
        rb.finish()
    assert not out.exists()
    rb.close()
    # Re-index, re-plan and resume: only what the changed base no longer holds is sent.
    index.update(base)
    p2 = plan(m, index.local)
    rb2 = Rebuilder.for_manifest(m, p2, out)
    assert 0 < rb2.bytes_pending <= 4096
    finish_from(rb2, src, out)


def test_index_is_persistent_and_incremental(tmp_path: Path) -> None:
    _src, _out, index = _setup(tmp_path)
    old = tmp_path / "images" / "old.img"
    before = index.images()
    assert [r.path.name for r in before] == ["old.img"]
    index.close()
    with ImageIndex(tmp_path / "index.db") as again:
        assert again.images() == before
        assert len(again.local.blocks) > 0
        m1 = again.update(old)  # unchanged: no rescan, same manifest
        with open(old, "ab") as f:
            f.write(b"x" * 100)
        m2 = again.update(old)
        assert m2.size == m1.size + 100 and m2.sha256 != m1.sha256
        old.unlink()
        again.sync_dir(tmp_path / "images")
        assert again.images() == []
        assert len(again.local.blocks) == 0


def test_missing_image_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        scan_image(tmp_path / "nope")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_is_reported_and_leaves_nothing(tmp_path: Path) -> None:
    rng = random.Random(5)
    img = tmp_path / "big.img"
    img.write_bytes(rng.randbytes(6 << 20))
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        m = scan_image(img)
        from dwcp.delta import LocalIndex

        p = plan(m, LocalIndex())
        with pytest.raises(DiskFullError, match="free"):
            Rebuilder.for_manifest(m, p, small / "out.img")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_chunk_lists_are_cached_in_the_index(tmp_path: Path) -> None:
    _src, _out, index = _setup(tmp_path)
    n = len(index.local.chunks)
    assert n > 0
    index.close()
    import dwcp.delta.index as index_mod

    with ImageIndex(tmp_path / "index.db") as again:
        real = index_mod.chunk_file
        index_mod.chunk_file = None  # type: ignore[assignment]
        try:
            assert len(again.local.chunks) == n  # read back, not recomputed
        finally:
            index_mod.chunk_file = real


def test_torn_journal_tail_is_cut_and_later_records_count(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    frames = list(encode(src, p.missing, batch_bytes=64 * 1024))
    rb = Rebuilder.for_manifest(m, p, out)
    rb.feed(frames[0])
    rb.close()
    with open(rb.state_dir / "journal", "ab") as f:
        f.write(b"torn-tail")  # a crash in the middle of a journal write
    rb2 = Rebuilder.for_manifest(m, p, out)
    before = rb2.bytes_pending
    rb2.feed(frames[1])
    rb2.close()
    rb3 = Rebuilder.for_manifest(m, p, out)
    assert rb3.bytes_pending < before
    rb3.abort()


def test_close_and_abort_are_idempotent(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    rb = Rebuilder.for_manifest(m, plan(m, index.local), out)
    rb.close()
    other = os.open(src, os.O_RDONLY)  # may reuse a number the Rebuilder had
    try:
        rb.close()
        rb.abort()
        os.fstat(other)  # still open: nobody closed it behind our back
    finally:
        os.close(other)
    with pytest.raises(ValueError, match="closed"):
        rb.feed(b"")


def test_removing_an_image_keeps_blocks_its_clones_hold(tmp_path: Path) -> None:
    data = make_image(random.Random(9), 300)
    (tmp_path / "images").mkdir()
    for name in ("golden.img", "clone.img"):
        (tmp_path / "images" / name).write_bytes(data)
    (tmp_path / "new.img").write_bytes(data)
    with ImageIndex(tmp_path / "index.db") as index:
        index.sync_dir(tmp_path / "images")
        m = scan_image(tmp_path / "new.img")
        assert plan(m, index.local).bytes_missing == 0
        (tmp_path / "images" / "golden.img").unlink()
        index.sync_dir(tmp_path / "images")
        assert plan(m, index.local).bytes_missing == 0  # the clone still has every block


def test_sync_dir_skips_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.img").write_bytes(b"x" * 5000)
    bad = tmp_path / "images" / "bad.img"
    bad.write_bytes(b"y" * 5000)
    bad.chmod(0)
    with ImageIndex(tmp_path / "index.db") as index:
        if os.access(bad, os.R_OK):  # root reads anything: make it vanish instead
            import dwcp.delta.index as index_mod

            real = index_mod.scan_image

            def flaky(p: Path, **kw: object) -> object:
                if Path(p).name == "bad.img":
                    raise ImageError("busy")
                return real(p)

            index_mod.scan_image = flaky  # type: ignore[assignment]
            try:
                index.sync_dir(tmp_path / "images")
            finally:
                index_mod.scan_image = real
        else:
            index.sync_dir(tmp_path / "images")
        assert [r.path.name for r in index.images()] == ["ok.img"]
        assert bad.resolve() in index.skipped


def test_coalesce_bounds_the_number_of_ranges(tmp_path: Path) -> None:
    from dwcp.delta.planner import coalesce

    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    n = len(p.missing)
    assert n > 10
    c = coalesce(p, 10)
    assert len(c.missing) == 10
    assert c.bytes_missing >= p.bytes_missing
    assert sum(e.length for e in c.extents) == p.size
    rb = Rebuilder.for_manifest(m, c, out)
    finish_from(rb, src, out)


def test_record_and_refresh(tmp_path: Path) -> None:
    src, out, index = _setup(tmp_path)
    m = scan_image(src)
    p = plan(m, index.local)
    rb = Rebuilder.for_manifest(m, p, out)
    for f in encode(src, rb.pending()):
        rb.feed(f)
    rb.finish()
    index.record(out, m)  # no re-scan: the rebuilt image was verified against m
    assert {r.path.name: r.sha256 for r in index.images()}["new.img"] == m.sha256.hex()
    assert plan(m, index.local).bytes_missing == 0
    old = tmp_path / "images" / "old.img"
    assert not index.refresh([old, out])
    with open(old, "r+b") as f:
        f.write(b"\x07" * 4096)
    assert index.refresh([old])
    old.unlink()
    assert index.refresh([old])
    assert [r.path.name for r in index.images()] == ["new.img"]
