"""A VM's definition (what the node needs to start it again anywhere) and its QEMU command.

Layout, under the node's data directory::

    DATA/vms/NAME/vm.json       the definition (written atomically)
    DATA/vms/NAME/kernel        optional kernel and initrd, copied in at define time so the
    DATA/vms/NAME/initrd        definition is self-contained and can travel with a migration
    DATA/vms/NAME/qmp.sock      QMP, mode 0600 inside the private data directory
    DATA/vms/NAME/console.log   the serial console (appended across restarts)
    DATA/vms/NAME/qemu.pid      QEMU's pid while it runs (QEMU writes and removes it)

The disk is an image of the node's store (``DATA/images/DISK``), so the delta
engine and ``dwcp migrate`` see it like any other image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dwcp.errors import UsageError, VmError
from dwcp.node.store import check_image_name

QEMU = "qemu-system-x86_64"
MEMORY_RE = re.compile(r"^(\d+)([MG]?)(i?B?)$", re.IGNORECASE)
QCOW2_MAGIC = b"QFI\xfb"


def parse_memory(text: str | int) -> int:
    """``256M``, ``1G``, ``512`` (MiB) -> MiB."""
    if isinstance(text, int):
        return text
    m = MEMORY_RE.match(text.strip())
    if m is None:
        raise UsageError(f"memory {text!r}: expected a size like 256M or 1G")
    n = int(m.group(1)) * (1024 if m.group(2).upper() == "G" else 1)
    if not 16 <= n <= 1 << 20:
        raise UsageError(f"memory {text!r}: expected 16M to 1024G")
    return n


@dataclass(frozen=True)
class VmDefinition:
    name: str
    disk: str  # an image name in DATA/images
    memory_mib: int = 256
    cpus: int = 1
    kernel: bool = False  # DATA/vms/NAME/kernel present
    initrd: bool = False
    append: str | None = None
    qemu_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        check_image_name(self.name)
        check_image_name(self.disk)
        if not 1 <= self.cpus <= 64:
            raise UsageError(f"cpus {self.cpus}: expected 1 to 64")
        if self.initrd and not self.kernel:
            raise UsageError("an initrd needs a kernel (--kernel)")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["qemu_args"] = list(self.qemu_args)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VmDefinition:
        try:
            return cls(
                name=str(d["name"]),
                disk=str(d["disk"]),
                memory_mib=int(d.get("memory_mib", 256)),
                cpus=int(d.get("cpus", 1)),
                kernel=bool(d.get("kernel", False)),
                initrd=bool(d.get("initrd", False)),
                append=None if d.get("append") is None else str(d["append"]),
                qemu_args=tuple(str(a) for a in d.get("qemu_args", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UsageError):
                raise
            raise UsageError(f"invalid VM definition: {exc}") from None


@dataclass(frozen=True)
class VmPaths:
    root: Path  # DATA/vms/NAME

    @property
    def definition(self) -> Path:
        return self.root / "vm.json"

    @property
    def kernel(self) -> Path:
        return self.root / "kernel"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd"

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def incoming(self) -> Path:
        """Present while QEMU is an incoming live-migration copy that has not run yet."""
        return self.root / "incoming"

    @property
    def console(self) -> Path:
        return self.root / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "qemu.pid"


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def save(paths: VmPaths, d: VmDefinition) -> None:
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(paths.definition, json.dumps(d.to_json(), indent=1).encode() + b"\n")


def load(paths: VmPaths) -> VmDefinition:
    try:
        raw = json.loads(paths.definition.read_bytes())
    except FileNotFoundError:
        raise UsageError(
            f"no VM {paths.root.name} is defined on this node: 'dwcp vm start "
            f"{paths.root.name} --disk IMAGE' defines and starts it"
        ) from None
    except ValueError as exc:
        raise VmError(f"{paths.definition} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(raw, dict):
        raise VmError(f"{paths.definition} is not a JSON object; fix or remove it")
    return VmDefinition.from_json(raw)


def detect_accel() -> str:
    """``kvm`` when /dev/kvm opens and the CPU has VMX/SVM, else ``tcg``.

    Why the CPU flags too: a nested host may expose /dev/kvm without
    virtualisation extensions, where KVM opens but cannot run a guest.
    ``DWCP_VM_ACCEL`` overrides (two hosts that migrate must use the same).
    """
    forced = os.environ.get("DWCP_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    return "kvm" if re.search(r"\b(vmx|svm)\b", flags) else "tcg"


def disk_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def qemu_argv(
    d: VmDefinition, paths: VmPaths, disk: Path, accel: str, incoming: str | None = None
) -> list[str]:
    """The QEMU command line: paused (``-S``; the supervisor ``cont``s once QMP is up),
    daemonized (the VM outlives a node restart; the node adopts it again by its QMP socket)."""
    if shutil.which(QEMU) is None:
        raise VmError(f"{QEMU} not found: install it (apt-get install qemu-system-x86)")
    argv = [
        QEMU,
        "-name", d.name,
        "-accel", accel,
        "-m", str(d.memory_mib),
        "-smp", str(d.cpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-S", "-daemonize",
        "-pidfile", str(paths.pidfile),
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-chardev", f"file,id=ser0,path={paths.console},append=on",
        "-serial", "chardev:ser0",
        "-blockdev", f"driver=file,filename={disk},node-name=file0",
        "-blockdev", f"driver={disk_format(disk)},file=file0,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=vd0",
    ]  # fmt: skip
    if d.kernel:
        argv += ["-kernel", str(paths.kernel)]
    if d.initrd:
        argv += ["-initrd", str(paths.initrd)]
    if d.append is not None:
        argv += ["-append", d.append]
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv + list(d.qemu_args)
