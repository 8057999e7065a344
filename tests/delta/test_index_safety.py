"""The image index and the scanner under failure: crashes and images that change."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dwcp.delta import ImageIndex, native, scan_image
from dwcp.errors import ImageError
from tests.delta.conftest import make_image


def test_image_changing_while_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = tmp_path / "vm.img"
    img.write_bytes(make_image(random.Random(1), 4096))  # 16 MiB: two scan windows
    real = native.block_fingerprints
    calls = []

    def writer_meanwhile(buf, bs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            with open(img, "r+b") as f:  # the VM writes while we read
                f.write(b"\x01")
        return real(buf, bs)

    monkeypatch.setattr(native, "block_fingerprints", writer_meanwhile)
    with pytest.raises(ImageError, match="changed while it was read"):
        scan_image(img)


def test_crash_during_index_update_keeps_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(make_image(random.Random(2), 300))
    db = tmp_path / "index.db"
    with ImageIndex(db) as index:
        first = index.update(img)
    img.write_bytes(make_image(random.Random(3), 310))

    import dwcp.delta.index as index_mod

    def crash(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt  # the process dies in the middle of the update

    with ImageIndex(db) as index:
        monkeypatch.setattr(index_mod, "scan_image", crash)
        with pytest.raises(KeyboardInterrupt):
            index.update(img)
    monkeypatch.undo()
    with ImageIndex(db) as index:
        (rec,) = index.images()
        assert rec.sha256 == first.sha256.hex()  # the old, consistent entry
        assert index.update(img).size == 310 * 4096  # and it heals on the next update
