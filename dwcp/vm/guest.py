"""A tiny test guest: Debian's kernel and a busybox initramfs whose init counts.

Why this guest: it boots under TCG in a few seconds on a small machine, needs no
disk image to install, and makes a live migration checkable from outside. Its
``/init`` prints ``TICK n UPTIME BOOT`` to the serial console every
``interval`` seconds and writes the same line into sector ``n`` of its virtio
disk (``/dev/vda``, fsynced). After a live migration the destination's console
goes on with ``n+1`` and the same BOOT id (no reboot), and the disk holds one
record per tick (no write lost).

``python -m dwcp.vm.guest OUTDIR`` fetches ``linux-image-amd64``'s kernel with
``apt-get download`` (cached in OUTDIR) and writes ``OUTDIR/vmlinuz`` and
``OUTDIR/initrd.gz``; it needs ``busybox-static`` installed.

Dirtying RAM (the live-migration benchmark): with ``dwcp.dirty=KIB`` on the kernel
command line (``dirty_append``; ``--dirty 2M`` prints it) the init also rewrites
``KIB`` KiB/s of a tmpfs file (``dwcp.dirty_ws=MIB``, default 32) with random data,
paced by ``/proc/uptime`` so a slow TCG guest still averages the asked rate. Random
data, because zero or repeated pages would be skipped or compressed away by QEMU and
the test would measure nothing; the same initrd serves every rate.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dwcp.errors import VmError

BUSYBOX = Path("/bin/busybox")
# virtio_blk and what it needs, in load order (Debian builds them as modules).
MODULES = (
    "virtio/virtio.ko",
    "virtio/virtio_ring.ko",
    "virtio/virtio_pci_modern_dev.ko",
    "virtio/virtio_pci_legacy_dev.ko",
    "virtio/virtio_pci.ko",
    "block/virtio_blk.ko",
)
APPEND = "console=ttyS0 quiet panic=-1"
TICK_RE = re.compile(rb"TICK (\d+) (\S+) (\S+)")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# the order of their dependencies is not known here: retry until none loads any more
for pass in 1 2 3 4; do for m in {modules}; do insmod /lib/modules/$m 2>/dev/null; done; done
boot=$(cat /proc/sys/kernel/random/boot_id | cut -c1-8)
dirty=0; ws=32
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    dwcp.dirty=*) dirty=$(echo "$arg" | cut -d= -f2);;
    dwcp.dirty_ws=*) ws=$(echo "$arg" | cut -d= -f2);;
  esac
done
if [ "$dirty" -gt 0 ]; then
  mkdir -p /mnt
  mount -t tmpfs -o size=$((ws + 16))m tmpfs /mnt
  dd if=/dev/urandom of=/mnt/src bs=64k count=128 2>/dev/null
  (
    k=$((dirty / 512)); [ $k -lt 1 ] && k=1; [ $k -gt 64 ] && k=64
    blocks=$((ws * 16)); p=0; done_kib=0
    read up idle < /proc/uptime; t0=${{up%.*}}${{up#*.}}
    echo "DIRTY $dirty KiB/s over $ws MiB"
    while true; do
      read up idle < /proc/uptime; now=${{up%.*}}${{up#*.}}
      want=$(( (now - t0) * dirty / 100 ))
      # at most one second's backlog: a guest that was paused does not burst afterwards
      [ $want -gt $((done_kib + dirty)) ] && done_kib=$((want - dirty))
      if [ $done_kib -lt $want ]; then
        [ $((p + k)) -gt $blocks ] && p=0
        dd if=/mnt/src of=/mnt/ws bs=64k count=$k skip=$((p % (128 - k))) seek=$p \\
          conv=notrunc 2>/dev/null
        p=$((p + k)); done_kib=$((done_kib + k * 64))
      else
        sleep 0.05
      fi
    done
  ) &
fi
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
n=0
while true; do
  n=$((n+1))
  line="TICK $n $(cut -d' ' -f1 /proc/uptime) $boot"
  echo "$line"
  if [ -b /dev/vda ]; then
    printf '%-511s\\n' "$line" \\
      | dd of=/dev/vda bs=512 seek=$n count=1 conv=notrunc,fsync 2>/dev/null
  fi
  sleep {interval}
done
"""


def dirty_append(kib_per_s: int, ws_mib: int = 32, append: str = APPEND) -> str:
    """The kernel command line that makes the guest dirty ``kib_per_s`` KiB/s of RAM."""
    if kib_per_s <= 0:
        return append
    return f"{append} dwcp.dirty={int(kib_per_s)} dwcp.dirty_ws={int(ws_mib)}"


def init_script(interval: float = 0.5) -> str:
    names = " ".join(Path(m).name for m in MODULES)
    return INIT.format(modules=names, interval=interval)


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An initramfs archive (cpio "newc"): (path, mode, data) entries, directories first."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        nlink = 2 if mode & 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(hdr + nb)
        pad(len(hdr) + len(nb))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def build_initrd(modules_dir: Path, out: Path, interval: float = 0.5) -> Path:
    """Write the counting guest's initramfs (gzip'd cpio) to ``out``."""
    if not BUSYBOX.is_file():
        raise VmError(f"{BUSYBOX} not found: apt-get install busybox-static")
    init = init_script(interval).encode()
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules")
    ]
    entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
    entries.append(("init", 0o100755, init))
    for m in MODULES:
        entries.append((f"lib/modules/{Path(m).name}", 0o100644, (modules_dir / m).read_bytes()))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(gzip.compress(_cpio_newc(entries), 6))
    os.replace(tmp, out)
    return out


def _kernel_deb(cache: Path) -> Path:
    """The cached kernel package, downloaded once with ``apt-get download``."""
    found = sorted(cache.glob("linux-image-*-amd64_*.deb"))
    if found:
        return found[-1]
    dep = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=False
    )
    m = re.search(r"Depends: (linux-image-\S+-amd64)", dep.stdout)
    if m is None:
        raise VmError(
            "apt-cache knows no linux-image-amd64: run 'apt-get update' first (Debian needed)"
        )
    got = subprocess.run(
        ["apt-get", "download", m.group(1)], cwd=cache, capture_output=True, text=True, check=False
    )
    found = sorted(cache.glob("linux-image-*-amd64_*.deb"))
    if got.returncode != 0 or not found:
        raise VmError(f"apt-get download {m.group(1)} failed: {got.stderr.strip()[-300:]}")
    return found[-1]


def build(outdir: Path, interval: float = 0.5) -> tuple[Path, Path]:
    """``(vmlinuz, initrd.gz)`` in ``outdir``, built once (cached)."""
    outdir.mkdir(parents=True, exist_ok=True)
    kernel, initrd = outdir / "vmlinuz", outdir / "initrd.gz"
    stamp = outdir / "initrd.init"  # the init the cached initrd holds: rebuilt when it changes
    want = init_script(interval)
    fresh = stamp.is_file() and stamp.read_text() == want
    if kernel.is_file() and initrd.is_file() and fresh:
        return kernel, initrd
    deb = _kernel_deb(outdir)
    with tempfile.TemporaryDirectory(dir=outdir) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp)
        vmlinuz = next(root.glob("boot/vmlinuz-*"))
        modules = next(root.glob("lib/modules/*/kernel/drivers"))
        build_initrd(modules, initrd, interval)
        shutil.copyfile(vmlinuz, kernel.with_name("vmlinuz.tmp"))
        os.replace(kernel.with_name("vmlinuz.tmp"), kernel)
    stamp.write_text(want)
    return kernel, initrd


def console_ticks(text: bytes) -> list[tuple[int, str]]:
    """``(n, boot)`` of every TICK line in a console log."""
    return [(int(m.group(1)), m.group(3).decode()) for m in TICK_RE.finditer(text)]


def disk_ticks(data: bytes) -> dict[int, str]:
    """``n -> boot`` of every tick record in a guest disk (sector n holds tick n)."""
    out: dict[int, str] = {}
    for n in range(1, len(data) // 512):
        m = TICK_RE.match(data, n * 512, n * 512 + 512)
        if m is not None and int(m.group(1)) == n:
            out[n] = m.group(3).decode()
    return out


def parse_rate_kib(text: str) -> int:
    """``2M`` / ``512K`` / ``1536`` (KiB) per second, as KiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KkMm]?)", text.strip())
    if m is None:
        raise ValueError("give KiB/s as a number, or with K or M (e.g. 2M)")
    scale = 1024 if m.group(2) in ("M", "m") else 1
    return int(float(m.group(1)) * scale)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dwcp.vm.guest", description=__doc__)
    p.add_argument("outdir", type=Path)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between ticks")
    p.add_argument("--dirty", default="0", help="RAM the guest rewrites per second (2M, 512K)")
    p.add_argument("--dirty-ws", type=int, default=32, help="MiB the dirtier cycles over")
    a = p.parse_args(argv)
    try:
        kib = parse_rate_kib(a.dirty)
    except ValueError as exc:
        print(f"error: --dirty {a.dirty}: {exc}", file=sys.stderr)
        return 2
    try:
        k, i = build(a.outdir, a.interval)
    except VmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {k}\ninitrd {i}\nappend {dirty_append(kib, a.dirty_ws)!r}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
