"""The counting test guest, built once per machine (cached), or a skip saying why not."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dwcp.errors import VmError
from dwcp.vm import guest

CACHE = Path(os.environ.get("DWCP_GUEST_CACHE", Path.home() / ".cache" / "dwcp-guest"))


def need_guest() -> tuple[Path, Path]:
    """``(kernel, initrd)``; skips when QEMU or busybox is missing or the build fails."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    if not guest.BUSYBOX.is_file():
        pytest.skip("busybox-static not installed")
    try:
        return guest.build(CACHE)
    except (VmError, OSError) as exc:
        pytest.skip(f"cannot build the test guest: {exc}")
