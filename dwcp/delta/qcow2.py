"""Just enough of the qcow2 header to know whether an image stands alone.

A qcow2 overlay names its backing file (the next layer of its chain) in its
header; copied without that layer it cannot be opened. The migration sends one
file, so the destination must already hold the layer under the name the
overlay gives (a bare name resolves next to the overlay, in ``images/``).
Layout (QEMU docs/interop/qcow2.txt, big-endian): magic ``QFI\\xfb``, version
(2 or 3), backing_file_offset (u64 at 8), backing_file_size (u32 at 16).
"""

from __future__ import annotations

import os
import struct

from dwcp.errors import ImageError

MAGIC = b"QFI\xfb"
_HEAD = struct.Struct(">4sIQI")
MAX_BACKING_NAME = 1023  # the format's limit


def backing_file(path: str | os.PathLike[str]) -> str | None:
    """The backing file an image names, or None (not qcow2, or a qcow2 without one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size or head[:4] != MAGIC:
                return None
            _magic, version, offset, size = _HEAD.unpack(head)
            if version not in (2, 3):
                raise ImageError(f"{path}: qcow2 version {version} is not supported")
            if offset == 0 or size == 0:
                return None
            if size > MAX_BACKING_NAME:
                raise ImageError(f"{path}: qcow2 backing file name of {size} bytes is invalid")
            f.seek(offset)
            raw = f.read(size)
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror}") from exc
    if len(raw) != size:
        raise ImageError(f"{path}: the qcow2 header's backing file name is truncated")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"{path}: the qcow2 backing file name is not UTF-8") from None
