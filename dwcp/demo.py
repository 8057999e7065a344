"""``python -m dwcp.demo``: two nodes on this machine migrate a VM there and back.

It creates a temporary directory, initialises nodes ``a`` and ``b`` on
loopback, makes them trust each other and joins them to a 4-replica PBFT
cluster that records who owns each VM (``a`` and ``b`` run replicas 0 and 1,
two plain replica processes the others). It builds a sample ext4 disk image
from system files and a modified copy (new and deleted files, as a running VM
would leave it). Then, with the progress bar:

1. cold: ``a`` owns VM ``vm.img`` and migrates it to ``b``, which has nothing;
2. the VM runs on ``b`` and changes its disk (the modified copy);
3. warm: ``b`` migrates it back to ``a``, which still has the old version;
4. live (when QEMU is installed): ``a`` boots a small guest that counts on its
   console and disk, and ``dwcp migrate --live`` moves the running VM to ``b``;
   the count goes on at ``b`` without a reboot, ownership committed in between.

Each migration ends only when the destination verified the image and the
cluster committed the new owner; the demo ends with the verified SHA-256, the
bytes saved and the owner. Everything is removed at the end; every step is
bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MiB = 1 << 20
STEP_TIMEOUT = 600.0  # seconds any one step may take
SOURCES = ("/usr/lib/python3.11", "/usr/share/perl", "/usr/share/doc", "/usr/share")


# --- sample images (shared with benchmarks/migrate_bench.py) -------------------------


def _files_under(root: Path, limit: int, rnd: random.Random) -> list[Path]:
    out: list[Path] = []
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in sorted(files):
            p = Path(dirpath) / f
            with contextlib.suppress(OSError):
                if p.is_file() and not p.is_symlink() and 0 < p.stat().st_size < 4 * MiB:
                    out.append(p)
                    total += p.stat().st_size
        if total >= limit:
            break
    rnd.shuffle(out)
    return out


def stage_tree(dest: Path, budget: int, *, sources: Sequence[str] = SOURCES, seed: int = 0) -> int:
    """Copy up to ``budget`` bytes of system files into ``dest``; returns bytes staged.

    Falls back to generated, compressible text when no source is readable.
    """
    rnd = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    staged = 0
    for src in sources:
        root = Path(src)
        if not root.is_dir():
            continue
        for i, f in enumerate(_files_under(root, budget * 2, rnd)):
            if staged >= budget:
                return staged
            target = dest / f"{i // 256:03d}" / f.name
            target.parent.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(f, target)
                staged += target.stat().st_size
        if staged >= budget:
            return staged
    words = [f"word{i}" for i in range(5000)]
    while staged < budget:
        text = " ".join(rnd.choice(words) for _ in range(40_000)).encode()
        (dest / f"gen{staged}.txt").write_bytes(text)
        staged += len(text)
    return staged


def build_ext4(image: Path, size_mib: int, tree: Path) -> None:
    """A raw ext4 image of ``size_mib`` MiB holding ``tree`` (``mkfs.ext4 -d``)."""
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", "-d", str(tree), str(image)],
        check=True,
        timeout=STEP_TIMEOUT,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )


def modify_ext4(src: Path, dst: Path, add: Path, *, remove: int = 20, seed: int = 1) -> None:
    """Copy ``src`` to ``dst``, then, inside the file system, delete ``remove`` files and
    write the files of ``add`` (debugfs, no mount needed): what a running VM leaves."""
    shutil.copyfile(src, dst)
    rnd = random.Random(seed)
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /000", str(dst)],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
    ).stdout
    names = [ln.split("/")[5] for ln in listing.splitlines() if ln.count("/") >= 6]
    names = [n for n in names if n and n not in (".", "..")]
    cmds = [f"rm /000/{n}" for n in rnd.sample(names, min(remove, len(names)))]
    cmds.append("mkdir /new")
    cmds += [
        f"write {p} /new/{i}-{p.name}" for i, p in enumerate(sorted(add.rglob("*"))) if p.is_file()
    ]
    script = dst.with_suffix(".debugfs")
    script.write_text("\n".join(cmds) + "\n")
    subprocess.run(
        ["debugfs", "-w", "-f", str(script), str(dst)],
        check=True,
        capture_output=True,
        timeout=STEP_TIMEOUT,
    )
    script.unlink()


def make_pair(work: Path, size_mib: int, data_mib: int) -> tuple[Path, Path]:
    """An ext4 image with ``data_mib`` of system files, and a modified copy."""
    tree, extra = work / "tree", work / "extra"
    stage_tree(tree, data_mib * MiB, seed=0)
    stage_tree(
        extra, max(1, data_mib // 16) * MiB, sources=("/usr/share/locale", "/usr/bin"), seed=7
    )
    v1, v2 = work / "vm-v1.img", work / "vm-v2.img"
    build_ext4(v1, size_mib, tree)
    modify_ext4(v1, v2, extra)
    shutil.rmtree(tree)
    shutil.rmtree(extra)
    return v1, v2


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


# --- nodes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dwcp(*args: str, show_stderr: bool = False) -> str:
    """Run the CLI; stderr (the progress bar) goes to the terminal only when asked."""
    r = subprocess.run(
        [sys.executable, "-m", "dwcp.cli", *args],
        stdout=subprocess.PIPE,
        stderr=None if show_stderr else subprocess.PIPE,
        text=True,
        timeout=STEP_TIMEOUT,
    )
    if r.returncode != 0:
        raise SystemExit(f"demo: 'dwcp {' '.join(args)}' failed: {r.stderr or r.returncode}")
    return r.stdout


class DemoNode:
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.config = root / name / "node.toml"
        out = dwcp("init", str(root / name), "--listen", f"127.0.0.1:{self.port}", "--name", name)
        self.pubkey = out.strip().splitlines()[-1]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, log: Path) -> None:
        from dwcp.node import control
        from dwcp.node.config import load_config

        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dwcp.node", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=f,
            )
        sock = load_config(self.config).control_path
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"demo: node {self.name} failed to start:\n{log.read_text()}")
            try:
                control.call(sock, "status", timeout=10)
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"demo: node {self.name} did not start within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ownership_cluster(root: Path, a: DemoNode, b: DemoNode) -> list[subprocess.Popen[bytes]]:
    """Write a 4-replica cluster file (a, b and two plain replicas), point a and b at it
    and start the two plain replicas; return their processes."""
    from dwcp.consensus.testing import free_ports
    from dwcp.identity import NodeKey

    others = [NodeKey.generate() for _ in range(2)]
    ports = free_ports(4)
    keys = [a.pubkey, b.pubkey, *(k.public.text for k in others)]
    cluster = root / "cluster.json"
    dwcp(
        "cluster",
        "init",
        str(cluster),
        *(f"--replica={k}@127.0.0.1:{p}" for k, p in zip(keys, ports, strict=True)),
        f"--client={a.pubkey}",
        f"--client={b.pubkey}",
    )
    for i, node in enumerate((a, b)):
        with open(node.config, "a", encoding="utf-8") as f:
            f.write(f'\n[consensus]\ncluster = "{cluster}"\nreplica = {i}\n')
        dwcp("--config", str(node.config), "cluster", "join")  # first start: an empty log
    procs = []
    for i, k in enumerate(others, start=2):
        k.save(root / f"replica-{i}.key")
        with open(root / f"replica-{i}.log", "ab") as log:
            cmd = [sys.executable, "-m", "dwcp.consensus.net", "replica", "--new"]
            cmd += ["--config", str(cluster), "--id", str(i)]
            cmd += [
                "--key",
                str(root / f"replica-{i}.key"),
                "--wal",
                str(root / f"replica-{i}.wal"),
            ]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    return procs


@contextlib.contextmanager
def two_nodes(root: Path) -> Iterator[tuple[DemoNode, DemoNode]]:
    a, b = DemoNode(root, "a"), DemoNode(root, "b")
    dwcp("--config", str(a.config), "peers", "add", "b", f"127.0.0.1:{b.port}", b.pubkey)
    dwcp("--config", str(b.config), "peers", "add", "a", f"127.0.0.1:{a.port}", a.pubkey)
    replicas = ownership_cluster(root, a, b)
    try:
        a.start(root / "a.log")
        b.start(root / "b.log")
        yield a, b
    finally:
        a.stop()
        b.stop()
        for p in replicas:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def migrate(src: DemoNode, image: str, to: str) -> dict[str, Any]:
    out = dwcp(
        "--config", str(src.config), "migrate", image, "--to", to, "--json", show_stderr=True
    )
    return dict(json.loads(out.strip().splitlines()[-1]))


def owner(node: DemoNode, vm: str) -> str:
    return dwcp("--config", str(node.config), "owner", vm).strip()


def live_step(root: Path, a: DemoNode, b: DemoNode) -> bool:
    """Step 4: move a running guest from a to b; True if its counter went on at b."""
    from dwcp.errors import VmError
    from dwcp.vm import guest

    if shutil.which("qemu-system-x86_64") is None or not guest.BUSYBOX.is_file():
        print("== live: skipped (needs qemu-system-x86 and busybox-static)")
        return True
    cache = Path(os.environ.get("DWCP_GUEST_CACHE", Path.home() / ".cache" / "dwcp-guest"))
    print("== live: a boots a small guest (Debian's kernel, a busybox init counting ticks)")
    try:
        kernel, initrd = guest.build(cache)
    except (VmError, OSError, subprocess.CalledProcessError) as exc:
        print(f"   skipped: cannot build the guest ({exc})")
        return True
    (root / "a" / "data" / "images" / "live.raw").write_bytes(bytes(4 * MiB))
    ca, cb = (str(n.config) for n in (a, b))
    dwcp("--config", ca, "vm", "start", "live", "--disk", "live.raw", "--memory", "128M",
         "--kernel", str(kernel), "--initrd", str(initrd), "--append", guest.APPEND)  # fmt: skip
    console = {n: root / n / "data" / "vms" / "live" / "console.log" for n in ("a", "b")}

    def ticks(n: str) -> list[tuple[int, str]]:
        with contextlib.suppress(OSError):
            return guest.console_ticks(console[n].read_bytes())
        return []

    try:
        wait_for(lambda: len(ticks("a")) >= 3, "the guest's first ticks", STEP_TIMEOUT)
        last, boot = ticks("a")[-1]
        print(f"   running on a: tick {last}; a migrates it live to b")
        out = dwcp("--config", ca, "migrate", "--live", "live", "--to", "b",
                   "--downtime-limit", "1500", "--json", show_stderr=True)  # fmt: skip
        res = json.loads(out.strip().splitlines()[-1])
        wait_for(lambda: any(t > last for t, _ in ticks("b")), "ticks at b", STEP_TIMEOUT)
        same = {bt for _, bt in ticks("b")} == {boot}
        print(
            f"   {res['seconds']:.1f} s, downtime {res['downtime_ms']:.0f} ms (ownership commit "
            f"included), {human(res['bytes_wire'])} on the wire; {owner(b, 'live')}"
        )
        verdict = "same boot, no reboot" if same else "REBOOTED"
        print(f"   b's console goes on from tick {last}: {verdict}")
        return same
    finally:
        for cfg in (ca, cb):  # wherever it runs now: the demo leaves no QEMU behind
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([sys.executable, "-m", "dwcp.cli", "--config", cfg, "vm", "stop",
                                "live"], capture_output=True, timeout=STEP_TIMEOUT)  # fmt: skip


def wait_for(pred: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: no {what} within {timeout:.0f} s")
        time.sleep(0.2)


def human(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dwcp.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=192, help="image size in MiB (default 192)")
    ap.add_argument("--data", type=int, default=80, help="MiB of files in the image (default 80)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--no-live", action="store_true", help="skip the live migration step")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dwcp-demo-"))
    try:
        print(f"== building a {args.size} MiB ext4 image with ~{args.data} MiB of system files")
        v1, v2 = make_pair(root, args.size, args.data)
        print(f"   {v1.name} and a modified copy {v2.name} (files deleted and added)")
        print("== starting nodes a and b on loopback, and a 4-replica ownership cluster")
        with two_nodes(root) as (a, b):
            images = {n: root / n / "data" / "images" for n in ("a", "b")}
            os.replace(v1, images["a"] / "vm.img")  # the VM's disk, on a
            print("== cold: a migrates VM vm.img to b (b has nothing yet)")
            cold = migrate(a, "vm.img", "b")
            print(
                f"   {human(cold['bytes_image'])} image, {human(cold['bytes_wire'])} on the wire, "
                f"{cold['seconds']:.2f} s; {owner(a, 'vm.img')}"
            )
            print("== the VM runs on b and changes its disk; warm: b migrates it back to a")
            expected = sha256_file(v2)
            os.replace(v2, images["b"] / "vm.img")
            warm = migrate(b, "vm.img", "a")
            print(
                f"   {human(warm['bytes_image'])} image, {human(warm['bytes_wire'])} on the wire, "
                f"{warm['seconds']:.2f} s; {owner(b, 'vm.img')}"
            )
            digest = sha256_file(images["a"] / "vm.img")
            ok = digest == expected == warm["sha256"]
            print(f"== result: a stores vm.img with sha256 {digest}")
            print(f"   {'verified: identical to the source' if ok else 'MISMATCH'}")
            saved = warm["bytes_image"] - warm["bytes_wire"]
            print(
                f"   warm migration sent {human(warm['bytes_wire'])} instead of "
                f"{human(warm['bytes_image'])}: {human(saved)} saved "
                f"({saved / warm['bytes_image']:.1%})"
            )
            print(f"   ownership committed by PBFT: a -> b -> a, epoch {warm['epoch']}")
            live_ok = True if args.no_live else live_step(root, a, b)
            return 0 if ok and live_ok else 1
    finally:
        if args.keep:
            print(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
