"""The live-migration control channel's names, limits and messages (both ends).

Kept apart from ``node`` so the two ends and the restart recovery agree on one
definition of the wire: JSON objects in ``dwcp.framing`` frames, bounded in size and
read with a deadline (a peer that stops answering fails the phase, never hangs it).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from dwcp import framing
from dwcp.errors import VmError
from dwcp.vm import definition as vmdef

CONTROL = "dwcp-live/1"
RELAY = "dwcp-live-relay/3"  # 2: zstd frames (relay.pipe packed); 3: "seq" (fanout)
MAX_FRAME = 256 << 20  # a kernel or initrd travels as one frame
MAX_CONTROL = 1 << 16


def encode_msg(obj: dict[str, Any]) -> bytes:
    """One control message: a JSON object in the shared length-prefixed frame."""
    return framing.encode(json.dumps(obj).encode())


async def read_msg(reader: Any, timeout: float) -> dict[str, Any]:
    """The next control message, within ``timeout`` and ``MAX_CONTROL`` bytes."""
    async with asyncio.timeout(timeout):
        raw = await framing.read_frame(reader, MAX_CONTROL)
    got = json.loads(raw)
    if not isinstance(got, dict):
        raise VmError("the peer sent a live-migration message that is not an object")
    return got


def disk_size(path: Path) -> tuple[str, int]:
    """(format, virtual size): what the destination's staging disk must be."""
    fmt = vmdef.disk_format(path)
    if fmt == "raw":
        return fmt, path.stat().st_size
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    return fmt, int(json.loads(out.stdout)["virtual-size"])


def stage(paths: Any, d: Any, blobs: list[bytes], disk: Path, prep: dict[str, Any]) -> None:
    """Destination: the VM's definition, kernel and initrd saved; an empty disk of the
    source's format and size for the mirror to fill."""
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = [f for present, f in ((d.kernel, paths.kernel), (d.initrd, paths.initrd)) if present]
    for f, blob in zip(files, blobs, strict=True):
        vmdef.write_atomic(f, blob)
    vmdef.save(paths, d)
    size = int(prep["size"])
    if prep.get("format") == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(size)],
                       check=True, timeout=30, capture_output=True)  # fmt: skip
    else:
        with open(disk, "wb") as f:
            f.truncate(size)
