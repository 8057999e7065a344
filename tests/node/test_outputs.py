"""A migration never destroys what the destination holds (issue 16): a different image,
a symlink, an overlay whose backing file is missing. Each case leaves the old content."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cluster import NodeProc, make_image, mutate, sha256_file

MiB = 1 << 20


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProc, NodeProc, Path]]:
    root = tmp_path_factory.mktemp("outputs")
    a, b = NodeProc(root, "a"), NodeProc(root, "b")
    a.trust(b)
    b.trust(a)
    a.start()
    b.start()
    try:
        yield a, b, root
    finally:
        a.stop()
        b.stop()


def test_a_different_image_is_replaced_only_with_force_or_backup(
    nodes: tuple[NodeProc, NodeProc, Path],
) -> None:
    """At 9038843 ``dwcp migrate other.raw --to b --name rnd.raw`` silently replaced the
    different rnd.raw stored at b."""
    a, b, root = nodes
    rnd, other = root / "rnd.raw", root / "other.raw"
    make_image(rnd, 2, seed=1)
    make_image(other, 2, seed=2)
    a.migrate_json(str(rnd), "--to", "b")
    old = sha256_file(b.images / "rnd.raw")
    r = a.cli("migrate", str(other), "--to", "b", "--name", "rnd.raw", check=False)
    assert r.returncode != 0 and "different image" in r.stderr and "--force" in r.stderr
    assert sha256_file(b.images / "rnd.raw") == old and list(b.partial.iterdir()) == []
    # --backup replaces it and keeps the old one
    a.migrate_json(str(other), "--to", "b", "--name", "rnd.raw", "--backup")
    assert sha256_file(b.images / "rnd.raw") == sha256_file(other)
    assert sha256_file(b.images / "rnd.raw.~1~") == old
    # --force replaces it (here: with the original again)
    a.migrate_json(str(rnd), "--to", "b", "--force")
    assert sha256_file(b.images / "rnd.raw") == old
    assert sorted(p.name for p in b.images.iterdir() if p.name.startswith("rnd")) == [
        "rnd.raw",
        "rnd.raw.~1~",
    ]
    # a later version of the same source file (the VM wrote to its disk) needs no flag
    newer = root / "rnd.raw.new"
    mutate(rnd, newer, [3, 100], seed=3)
    newer.replace(rnd)
    res = a.migrate_json(str(rnd), "--to", "b")
    assert res["bytes_missing"] == 2 * 4096 and sha256_file(b.images / "rnd.raw") == res["sha256"]


def test_a_symlink_or_fifo_at_the_destination_is_never_replaced(
    nodes: tuple[NodeProc, NodeProc, Path],
) -> None:
    import os

    a, b, root = nodes
    target = root / "precious.txt"
    target.write_text("do not touch\n")
    (b.images / "link.img").symlink_to(target)
    os.mkfifo(b.images / "fifo.img")
    img = root / "some.img"
    make_image(img, 1, seed=4)
    for name in ("link.img", "fifo.img"):
        r = a.cli("migrate", str(img), "--to", "b", "--name", name, "--force", check=False)
        assert r.returncode != 0 and "not a regular file" in r.stderr, r.stderr
    assert (b.images / "link.img").is_symlink() and target.read_text() == "do not touch\n"
    assert (b.images / "fifo.img").is_fifo()
    (b.images / "link.img").unlink()
    (b.images / "fifo.img").unlink()


def _overlay(path: Path, backing: str, data_mib: int = 2) -> None:
    """A qcow2 header naming ``backing`` (what the migration reads of it), then data."""
    name = backing.encode()
    head = struct.pack(">4sIQI", b"QFI\xfb", 3, 104, len(name))
    with open(path, "wb") as f:
        f.write(head.ljust(104, b"\0") + name)
        f.write(bytes(range(256)) * (data_mib * MiB // 256))


def test_a_qcow2_overlay_needs_its_backing_file_at_the_destination(
    nodes: tuple[NodeProc, NodeProc, Path],
) -> None:
    """At 9038843 an overlay migrated alone was reported verified but could not be opened."""
    a, b, root = nodes
    base, top = root / "base.qcow2", root / "top.qcow2"
    make_image(base, 2, seed=5)
    _overlay(top, "base.qcow2")
    r = a.cli("migrate", str(top), "--to", "b", check=False)
    assert r.returncode != 0 and "'base.qcow2'" in r.stderr and "overlay" in r.stderr, r.stderr
    assert not (b.images / "top.qcow2").exists() and list(b.partial.iterdir()) == []
    a.migrate_json(str(base), "--to", "b")  # the layer first, then the overlay
    res = a.migrate_json(str(top), "--to", "b")
    assert sha256_file(b.images / "top.qcow2") == sha256_file(top) == res["sha256"]
    far = root / "far.qcow2"
    _overlay(far, "/var/lib/images/base.qcow2")
    r = a.cli("migrate", str(far), "--to", "b", check=False)
    assert r.returncode != 0 and "would not resolve" in r.stderr and "rebase" in r.stderr
    assert not (b.images / "far.qcow2").exists()
