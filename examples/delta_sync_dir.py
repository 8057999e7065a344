"""Delta-sync a directory of images with ``dwcp.delta`` (no network needed).

    python examples/delta_sync_dir.py [SRC_DIR DST_DIR]

For each image in SRC_DIR, write a delta against every image DST_DIR already holds
(so a new VM cloned from a template costs only its changed blocks), then rebuild it
in DST_DIR, verified by SHA-256. Without arguments it makes a small demo in a temp
directory: a template, and two VMs that differ from it in a few blocks.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import dwcp.delta as hde

MiB = 1 << 20


def sync(src: Path, dst: Path, work: Path) -> None:
    for image in sorted(p for p in src.iterdir() if p.is_file()):
        target = dst / image.name
        bases: list[str | os.PathLike[str]] = [p for p in sorted(dst.iterdir()) if p.is_file()]
        if not bases:
            target.write_bytes(image.read_bytes())  # nothing to diff against: copy
            print(f"{image.name}: copied {image.stat().st_size / MiB:.1f} MiB")
            continue
        delta = work / f"{image.name}.dwcpd"
        st = hde.make_delta(image, bases, delta)
        hde.apply_delta(delta, bases, target)
        print(
            f"{image.name}: {st.bytes_image / MiB:.1f} MiB image, "
            f"delta {st.bytes_written / MiB:.2f} MiB "
            f"({st.bytes_copied / MiB:.1f} MiB found in {len(bases)} base(s))"
        )
        assert target.read_bytes() == image.read_bytes()
        delta.unlink()


def demo(root: Path) -> tuple[Path, Path]:
    src, dst = root / "src", root / "dst"
    src.mkdir()
    dst.mkdir()
    template = os.urandom(4 * MiB)
    (src / "a-template.raw").write_bytes(template)
    for i, name in enumerate(("vm1.raw", "vm2.raw")):
        data = bytearray(template)
        data[i * MiB : i * MiB + 8192] = os.urandom(8192)
        (src / name).write_bytes(bytes(data))
    return src, dst


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        if len(sys.argv) == 3:
            sync(Path(sys.argv[1]), Path(sys.argv[2]), Path(tmp))
        else:
            sync(*demo(Path(tmp)), Path(tmp))
