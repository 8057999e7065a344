"""The README's main command works end to end (small image, same code path)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from node.cluster import ENV


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs (dev.sh env)")
def test_demo_migrates_there_and_back_with_ownership() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dwcp.demo", "--size", "32", "--data", "8"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verified: identical to the source" in r.stdout
    assert "ownership committed by PBFT: a -> b -> a, epoch 3" in r.stdout
    if shutil.which("qemu-system-x86_64") is not None:  # step 4, the live VM
        assert "same boot, no reboot" in r.stdout, r.stdout
        assert "live: skipped" not in r.stdout, r.stdout
