"""``dwcp delta`` / ``dwcp patch`` never destroy an output (issue 16): a symlink, a device,
a FIFO or an existing file is left as it was unless the user says ``--force`` or
``--backup``; ``-`` is standard output / input."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from node.cluster import make_image, mutate

from dwcp.cli import EXIT_USAGE, main


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old.raw", tmp_path / "new.raw"
    make_image(old, 2, seed=1)
    mutate(old, new, [3, 100, 300], seed=2)
    return old, new


def _delta(new: Path, old: Path, out: str, *extra: str) -> int:
    return main(["delta", str(new), "--base", str(old), "-o", out, *extra])


def test_a_symlink_output_is_refused_and_its_target_kept(
    images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = images
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert _delta(new, old, str(link), "--force") == EXIT_USAGE
    assert "is a symlink" in capsys.readouterr().err
    assert link.is_symlink() and target.read_bytes() == b"keep me"


def test_a_fifo_output_is_refused(
    images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = images
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert _delta(new, old, str(fifo), "--force") == EXIT_USAGE
    assert "is a FIFO" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_device_output_is_refused(
    images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device node made for the test (as root), else /dev/null (not replaceable then)."""
    old, new = images
    dev = tmp_path / "null"
    if os.geteuid() == 0:
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    else:
        dev = Path("/dev/null")
    before = os.lstat(dev)
    assert _delta(new, old, str(dev), "--force") == EXIT_USAGE
    assert "is a character device" in capsys.readouterr().err
    after = os.lstat(dev)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino


def test_an_existing_file_needs_force_or_backup(
    images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = images
    out = tmp_path / "out.dwcpd"
    out.write_bytes(b"an older delta")
    assert _delta(new, old, str(out)) == EXIT_USAGE
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"an older delta"
    assert _delta(new, old, str(out), "--backup") == 0
    assert (tmp_path / "out.dwcpd.~1~").read_bytes() == b"an older delta"
    assert out.read_bytes()[:8] == b"DWCPDLT\x01"
    assert _delta(new, old, str(out), "--backup") == 0
    assert (tmp_path / "out.dwcpd.~2~").read_bytes()[:8] == b"DWCPDLT\x01"
    assert _delta(new, old, str(out), "--force") == 0
    assert not (tmp_path / "out.dwcpd.~3~").exists()


def test_patch_output_needs_force_and_is_never_a_symlink(
    images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = images
    d = tmp_path / "d.dwcpd"
    assert _delta(new, old, str(d)) == 0
    out = tmp_path / "rebuilt.raw"
    out.write_bytes(b"other image")
    assert main(["patch", str(d), "--base", str(old), "-o", str(out)]) == EXIT_USAGE
    assert out.read_bytes() == b"other image"
    link = tmp_path / "rebuilt.lnk"
    link.symlink_to(out)
    assert main(["patch", str(d), "--base", str(old), "-o", str(link), "--force"]) == EXIT_USAGE
    assert out.read_bytes() == b"other image" and link.is_symlink()
    assert main(["patch", str(d), "--base", str(old), "-o", "-"]) == EXIT_USAGE
    assert "needs a file" in capsys.readouterr().err
    assert main(["patch", str(d), "--base", str(old), "-o", str(out), "--force"]) == 0
    assert out.read_bytes() == new.read_bytes()


def test_dash_is_stdout_for_delta_and_stdin_for_patch(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """``-o -`` used to create a file named ``-``."""
    old, new = images
    cmd = [sys.executable, "-m", "dwcp.cli"]
    made = subprocess.run(
        [*cmd, "delta", str(new), "--base", str(old), "-o", "-", "--json"],
        capture_output=True,
        cwd=tmp_path,
        check=True,
    )
    assert not (tmp_path / "-").exists()
    assert made.stdout[:8] == b"DWCPDLT\x01"
    assert b'"bytes_written"' in made.stderr.splitlines()[-1]
    out = tmp_path / "from-stdin.raw"
    subprocess.run(
        [*cmd, "patch", "-", "--base", str(old), "-o", str(out)],
        input=made.stdout,
        capture_output=True,
        cwd=tmp_path,
        check=True,
    )
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(new.read_bytes()).digest()


def test_delta_dry_run_writes_nothing_and_its_figures_equal_a_real_run(
    images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    old, new = images
    out = tmp_path / "d.dwcpd"
    assert _delta(new, old, str(out), "--dry-run", "--json") == 0
    dry = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert not out.exists() and dry["dry_run"] is True
    assert _delta(new, old, str(out), "--json") == 0
    real = json.loads(capsys.readouterr().out.splitlines()[-1])
    for key in ("bytes_image", "bytes_zero", "bytes_copied", "bytes_changed", "bytes_written"):
        assert dry[key] == real[key], key
    assert real["bytes_written"] == out.stat().st_size
