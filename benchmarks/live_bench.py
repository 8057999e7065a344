"""Live migration of a running VM: ``dwcp migrate --live`` against QEMU's own (issue 12).

    flock /tmp/dwcp-bench.lock .venv/bin/python benchmarks/live_bench.py [--quick] [--json]

A TCG guest (``dwcp.vm.guest``: Debian's kernel, a busybox init that counts on console and
disk and rewrites N KiB/s of random data in a tmpfs) moves from namespace a to namespace b
through the project's link emulator (100 Mbit/s, 25 ms each way = 50 ms RTT, 0.5% loss),
at 0, ~2 and ~6 MiB/s of dirtying. Per rate, in one run on the same link and guest:

- ``dwcp``: two real daemons (one per namespace), ``dwcp vm start`` at a, then the op of
  ``dwcp migrate --live g --to b --json`` (called on the control socket to see its phases;
  QUIC with its own congestion control; with ``[consensus]``: 4 PBFT replicas, 2 per side).
- ``native-reno`` / ``native-bbr``: what a user of plain QEMU would run (libvirt's
  ``--copy-storage-all``): the destination QEMU under ``-incoming defer`` exporting its disk
  over NBD on TCP, the source's ``blockdev-mirror sync=full`` to it until READY, then
  ``migrate tcp:`` with multifd 4 + zstd-1 and ``pause-before-switchover``; at
  ``pre-switchover`` the mirror is completed and the destination ``cont``\\ s. The kernel's
  TCP congestion control in both namespaces is Reno (loss-based) or BBR.

Reported per row: total seconds (dwcp: the command's wall time; native: destination QEMU
launch to its ``cont``), downtime (source paused to destination running; QEMU's own figure
beside it), bytes on the wire (IP bytes the emulator forwarded, both directions), whether
it converged within ``--timeout``, and whether the counter went on at the destination with
the same boot id. A native run that does not converge is cancelled (the source keeps
running); so is dwcp's (the command is stopped and the daemons torn down).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _nodes import BenchNode, cli

from dwcp.consensus.testing import free_ports
from dwcp.errors import DwcpError, MigrationAbortedError
from dwcp.identity import NodeKey
from dwcp.netemu.link import Link
from dwcp.node import control
from dwcp.node.config import load_config
from dwcp.vm import definition as vmdef
from dwcp.vm import guest
from dwcp.vm.definition import VmDefinition, VmPaths
from dwcp.vm.qmp import QmpClient

PY = sys.executable
RATE_BPS, DELAY_MS, LOSS = 100e6, 25.0, 0.005
RATES_KIB = {"0": 0, "2M": 2048, "6M": 6144}
MODES = ("dwcp", "native-reno", "native-bbr")
# also "dwcp-1ch": QEMU's one stream (no multifd); "dwcp-qz": multifd with QEMU's zstd-1;
# "dwcp-pc": one stream with --postcopy (the ladder's last rung is postcopy, not the abort)
CACHE = Path(os.environ.get("DWCP_GUEST_CACHE", Path.home() / ".cache" / "dwcp-guest"))
BOOT_SECONDS = 240.0  # a TCG boot on a loaded 2-core machine took ~30 s
WARM_SECONDS = 3.0  # after the first tick (and the dirtier's start) before migrating


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for(pred: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def ticks(console: Path) -> list[tuple[int, str]]:
    try:
        return guest.console_ticks(console.read_bytes())
    except FileNotFoundError:
        return []


def guest_ready(console: Path, dirty: bool) -> bool:
    try:
        text = console.read_bytes()
    except FileNotFoundError:
        return False
    return bool(guest.console_ticks(text)) and (not dirty or b"DIRTY " in text)


def make_disk(path: Path, mib: int) -> None:
    """Half random (what the mirror must carry), half a hole (skipped by both)."""
    with open(path, "wb") as f:
        f.write(os.urandom((mib << 20) // 2))
        f.truncate(mib << 20)


def wire_bytes(link: Link) -> int:
    s = link.stats()
    return s.ab.tx_bytes + s.ba.tx_bytes


def kill_pidfile(p: Path) -> None:
    try:
        pid = int(p.read_text().strip())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


# --- dwcp -----------------------------------------------------------------------------


def run_dwcp(
    link: Link,
    root: Path,
    kib: int,
    a: argparse.Namespace,
    multifd: int | None = None,
    compress: str = "dwcp",
    postcopy: bool = False,
) -> dict[str, Any]:
    kernel, initrd = guest.build(CACHE)
    pa, pb = free_ports(2)
    na = BenchNode(root, "a", f"{link.addr_a}:{pa}")
    nb = BenchNode(root, "b", f"{link.addr_b}:{pb}")
    na.cli("peers", "add", "b", f"{link.addr_b}:{pb}", nb.pubkey)
    nb.cli("peers", "add", "a", f"{link.addr_a}:{pa}", na.pubkey)
    make_disk(na.images / "g.raw", a.disk_mib)
    replicas = _cluster(link, root, na, nb) if a.consensus else []
    na.start(link, "a")
    nb.start(link, "b")
    try:
        na.cli(
            "vm", "start", "g", "--disk", "g.raw", "--memory", f"{a.memory}M",
            "--kernel", str(kernel), "--initrd", str(initrd),
            "--append", guest.dirty_append(kib, a.ws_mib),
        )  # fmt: skip
        src_console, dst_console = na.vms / "g" / "console.log", nb.vms / "g" / "console.log"
        wait_for(lambda: guest_ready(src_console, kib > 0), "the guest's first tick", BOOT_SECONDS)
        time.sleep(WARM_SECONDS)
        last, boot = ticks(src_console)[-1]
        w0 = wire_bytes(link)
        t0 = time.monotonic()
        row: dict[str, Any] = {"converged": False}
        phases: dict[str, float] = {}

        def progress(data: dict[str, Any]) -> None:
            now = time.monotonic() - t0
            phases.setdefault(str(data.get("phase", "")), round(now, 2))
            if now > a.timeout:
                raise TimeoutError

        try:
            # the op `dwcp migrate --live g --to b --json` sends, called here to see its phases
            res = control.call(
                load_config(na.config).control_path, "migrate_live",
                {"name": "g", "to": "b", "downtime_limit": None, "max_downtime": a.max_downtime,
                 "converge_timeout": a.converge_timeout, "multifd": multifd,
                 "lanes": a.lanes if multifd != 0 else None, "compress": compress,
                 "postcopy": postcopy},
                on_progress=progress,
            )  # fmt: skip
            row.update(
                converged=True,
                seconds=round(time.monotonic() - t0, 2),
                downtime_ms=res["downtime_ms"],
                qemu_downtime_ms=res.get("qemu_downtime_ms"),
                bytes_ram=res["bytes_ram"],
                bytes_disk=res["bytes_disk"],
                bytes_relayed=res["bytes_wire"],
                owner=res.get("owner"),
                epoch=res.get("epoch"),
                downtime_limit_ms=res.get("downtime_limit_ms"),
                converge_rung=res.get("converge_rung"),
                multifd_channels=res.get("multifd_channels"),
                lanes=res.get("lanes"),
                postcopy=res.get("postcopy"),
            )
        except TimeoutError:
            row.update(seconds=None, error=f"no completion within {a.timeout:g} s")
        except MigrationAbortedError as exc:
            row.update(seconds=None, result="aborted", error=str(exc)[-300:])
        except DwcpError as exc:
            row.update(seconds=None, error=str(exc)[-300:])
        row["phases"] = phases
        row["bytes_wire"] = wire_bytes(link) - w0
        if row["converged"]:
            row["continued"] = _continued(dst_console, last, boot)
        else:
            st = json.loads(na.cli("vm", "status", "g", "--json").stdout.splitlines()[-1])
            row["source_state"] = st["state"]
        return row
    finally:
        for n in (na, nb):
            kill_pidfile(n.vms / "g" / "qemu.pid")
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
                n.proc.wait(timeout=30)
        for r in replicas:
            r.terminate()
            r.wait(timeout=30)


def _cluster(link: Link, root: Path, na: BenchNode, nb: BenchNode) -> list[subprocess.Popen[bytes]]:
    """A 4-replica PBFT cluster split over the link: the two nodes (replicas 0, 1) and one
    standalone replica on each side (2 at a, 3 at b), so a commit's quorum of 3 always
    crosses the WAN, as it would between two sites."""
    others = [NodeKey.generate() for _ in range(2)]
    for i, k in enumerate(others):
        k.save(root / f"replica-{i + 2}.key")
    ports = free_ports(4)
    hosts = [link.addr_a, link.addr_b, link.addr_a, link.addr_b]
    keys = [na.pubkey, nb.pubkey, *(k.public.text for k in others)]
    cluster = root / "cluster.json"
    cli("cluster", "init", str(cluster),
         *(f"--replica={k}@{h}:{p}" for k, h, p in zip(keys, hosts, ports, strict=True)),
         f"--client={na.pubkey}", f"--client={nb.pubkey}")  # fmt: skip
    for i, n in enumerate((na, nb)):
        with open(n.config, "a", encoding="utf-8") as f:
            f.write(f'\n[consensus]\ncluster = "{cluster}"\nreplica = {i}\ntimeout = 60\n')
        n.cli("cluster", "join")
    procs = []
    for i, side in ((2, "a"), (3, "b")):
        cmd = [PY, "-m", "dwcp.consensus.net", "replica", "--config", str(cluster),
               "--id", str(i), "--key", str(root / f"replica-{i}.key"),
               "--wal", str(root / f"replica-{i}.wal"), "--new"]  # fmt: skip
        with open(root / f"replica-{i}.log", "ab") as out:
            procs.append(link.popen(side, cmd, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _continued(console: Path, last: int, boot: str) -> bool:
    try:
        wait_for(lambda: any(n > last for n, _ in ticks(console)), "ticks at b", 60)
    except RuntimeError:
        return False
    return {b for _, b in ticks(console)} == {boot}


# --- QEMU native ----------------------------------------------------------------------


def _native_vm(root: Path, side: str) -> VmPaths:
    kernel, initrd = guest.build(CACHE)
    p = VmPaths(root / f"native-{side}")
    p.root.mkdir(parents=True)
    shutil.copyfile(kernel, p.kernel)
    shutil.copyfile(initrd, p.initrd)
    return p


def _launch(
    link: Link, side: str, d: VmDefinition, p: VmPaths, disk: Path, inc: str | None
) -> None:
    argv = vmdef.qemu_argv(d, p, disk, "tcg", inc)
    r = link.run_in(side, argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"QEMU at {side} refused to start: {r.stderr.strip()[-300:]}")


async def _poll_job(q: QmpClient, deadline: float) -> None:
    while time.monotonic() < deadline:
        jobs = await q.execute("query-block-jobs")
        job = next((j for j in jobs if j.get("device") == "m0"), None)
        if job is None:
            raise RuntimeError("the NBD mirror stopped")
        if job.get("ready"):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError


async def _native(
    link: Link, root: Path, kib: int, cc: str, a: argparse.Namespace
) -> dict[str, Any]:
    for side in ("a", "b"):
        link.run_in(side, ["sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={cc}"],
                    check=True)  # fmt: skip
    d = VmDefinition(name="g", disk="g.raw", memory_mib=a.memory, cpus=1, kernel=True,
                     initrd=True, append=guest.dirty_append(kib, a.ws_mib))  # fmt: skip
    ps, pd = _native_vm(root, "a"), _native_vm(root, "b")
    src_disk, dst_disk = ps.root / "g.raw", pd.root / "g.raw"
    make_disk(src_disk, a.disk_mib)
    with open(dst_disk, "wb") as f:
        f.truncate(a.disk_mib << 20)
    nbd_port, mig_port = free_ports(2)
    dst = link.addr_b
    row: dict[str, Any] = {"converged": False}
    qs = qd = None
    try:
        _launch(link, "a", d, ps, src_disk, None)
        qs = await QmpClient.connect(str(ps.qmp))
        await qs.execute("cont")
        await asyncio.to_thread(
            wait_for, lambda: guest_ready(ps.console, kib > 0), "the guest's first tick",
            BOOT_SECONDS,
        )  # fmt: skip
        await asyncio.sleep(WARM_SECONDS)
        last, boot = ticks(ps.console)[-1]
        w0 = wire_bytes(link)
        t0 = time.monotonic()
        deadline = t0 + a.timeout
        _launch(link, "b", d, pd, dst_disk, "defer")
        qd = await QmpClient.connect(str(pd.qmp))
        caps = [{"capability": "multifd", "state": True}]
        params = {"multifd-channels": 4, "multifd-compression": "zstd", "multifd-zstd-level": 1}
        await qd.execute("migrate-set-capabilities",
                         {"capabilities": [*caps, {"capability": "late-block-activate",
                                                    "state": True}]})  # fmt: skip
        await qd.execute("migrate-set-parameters", params)
        addr = {"type": "inet", "data": {"host": dst, "port": str(nbd_port)}}
        await qd.execute("nbd-server-start", {"addr": addr})
        await qd.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk0",
                                              "name": "disk0", "writable": True})  # fmt: skip
        await qd.execute("migrate-incoming", {"uri": f"tcp:{dst}:{mig_port}"})
        await qs.execute("blockdev-add", {
            "driver": "nbd", "node-name": "tgt0", "export": "disk0",
            "server": {"type": "inet", "host": dst, "port": str(nbd_port)}})  # fmt: skip
        await qs.execute(
            "blockdev-mirror", {"job-id": "m0", "device": "disk0", "target": "tgt0", "sync": "full"}
        )
        await _poll_job(qs, deadline)
        row["disk_seconds"] = round(time.monotonic() - t0, 2)
        await qs.execute("migrate-set-capabilities", {"capabilities": [
            *caps, {"capability": "pause-before-switchover", "state": True}]})  # fmt: skip
        await qs.execute("migrate-set-parameters", params)
        await qs.execute("migrate", {"uri": f"tcp:{dst}:{mig_port}"})
        info: dict[str, Any] = {}
        peak_dirty = 0
        while time.monotonic() < deadline:
            info = await qs.execute("query-migrate", timeout=60)
            ram = info.get("ram", {})
            peak_dirty = max(peak_dirty, int(ram.get("dirty-pages-rate", 0)))
            if info.get("status") in ("pre-switchover", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)
        row["dirty_mib_s"] = round(peak_dirty * 4096 / (1 << 20), 2)
        row["dirty_syncs"] = info.get("ram", {}).get("dirty-sync-count")
        if info.get("status") != "pre-switchover":
            row.update(seconds=None, bytes_wire=wire_bytes(link) - w0,
                       error=f"{info.get('status')} after {a.timeout:g} s, expected downtime "
                             f"{info.get('expected-downtime')} ms")  # fmt: skip
            await qs.execute("migrate_cancel")
            with _quiet():
                await qs.execute("block-job-cancel", {"device": "m0", "force": True})
            await asyncio.sleep(2.0)
            row["source_state"] = (await qs.execute("query-status")).get("status")
            return row
        t_pause = time.monotonic()
        await qs.execute("block-job-cancel", {"device": "m0"})
        await qs.wait_event("BLOCK_JOB_COMPLETED", 60, match={"device": "m0"})
        await qs.execute("blockdev-del", {"node-name": "tgt0"})
        await qs.execute("migrate-continue", {"state": "pre-switchover"})
        while (info := await qs.execute("query-migrate", timeout=60)).get("status") != "completed":
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline + 60:
                raise RuntimeError(f"native switch-over {info.get('status')}")
            await asyncio.sleep(0.02)
        while (await qd.execute("query-status")).get("status") == "inmigrate":
            await asyncio.sleep(0.02)
        await qd.execute("nbd-server-stop")
        await qd.execute("cont")
        t1 = time.monotonic()
        ram = info.get("ram", {})
        row.update(
            converged=True,
            seconds=round(t1 - t0, 2),
            downtime_ms=round((t1 - t_pause) * 1000, 1),
            qemu_downtime_ms=info.get("downtime"),
            bytes_ram=int(ram.get("transferred", 0)),
            bytes_wire=wire_bytes(link) - w0,
        )
        row["continued"] = await asyncio.to_thread(_continued, pd.console, last, boot)
        return row
    finally:
        for q in (qs, qd):
            if q is not None:
                await q.close()
        kill_pidfile(ps.pidfile)
        kill_pidfile(pd.pidfile)


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], Exception)


def run_native(link: Link, root: Path, kib: int, cc: str, a: argparse.Namespace) -> dict[str, Any]:
    try:
        return asyncio.run(_native(link, root, kib, cc, a))
    except (RuntimeError, TimeoutError, OSError) as exc:
        return {"converged": False, "seconds": None, "error": str(exc)[-300:]}
    finally:
        for side in ("a", "b"):
            link.run_in(side, ["sysctl", "-q", "-w", "net.ipv4.tcp_congestion_control=reno"])


# --- the run ---------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_row(rate: str, mode: str, r: dict[str, Any]) -> None:
    mb = r.get("bytes_wire")
    print(f"{rate:>4s} {mode:12s} {_fmt(r.get('seconds'), '8.2f')} s  "
          f"down {_fmt(r.get('downtime_ms'), '7.0f')} ms "
          f"(qemu {_fmt(r.get('qemu_downtime_ms'), '>5')})  "
          f"wire {_fmt(mb / 1e6 if mb is not None else None, '7.1f')} MB  "
          f"conv={r.get('converged')} cont={r.get('continued', '-')} "
          f"{r.get('error', '')}", flush=True)  # fmt: skip


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rate, by in rows.items():
        for dm in ("dwcp", "dwcp-1ch", "dwcp-qz"):
            d = by.get(dm, {}).get("seconds")
            for mode in ("native-reno", "native-bbr", "dwcp-1ch", "dwcp-qz"):
                n = by.get(mode, {}).get("seconds")
                if mode in by and dm in by and dm != mode:
                    key = f"{rate}:{mode}" if dm == "dwcp" else f"{rate}:{dm}/{mode}"
                    out[key] = round(d / n, 3) if d and n else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="rate 0 only, dwcp and native-bbr")
    p.add_argument("--rates", default=",".join(RATES_KIB), help="of 0,2M,6M")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--memory", type=int, default=256, help="guest MiB")
    p.add_argument("--disk-mib", type=int, default=16)
    p.add_argument("--ws-mib", type=int, default=32, help="MiB the dirtier cycles over")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per migration")
    p.add_argument(
        "--no-consensus",
        dest="consensus",
        action="store_false",
        help="dwcp without [consensus] (no ownership commit in its downtime)",
    )
    p.add_argument("--converge-timeout", type=float, default=80.0,
                   help="dwcp's RAM-phase budget before its clean abort (s)")  # fmt: skip
    p.add_argument("--max-downtime", type=int, default=None,
                   help="dwcp's ladder cap (ms; default the node's, 3000)")  # fmt: skip
    p.add_argument("--multifd", type=int, default=None,
                   help="dwcp's multifd channels (default: the node's, 4)")  # fmt: skip
    p.add_argument("--lanes", type=int, default=None,
                   help="sessions the multifd channels spread over (default 1 each)")  # fmt: skip
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rates = ["0"] if a.quick else a.rates.split(",")
    modes = ["dwcp", "native-bbr"] if a.quick else a.modes.split(",")
    if a.quick:
        a.memory, a.disk_mib, a.timeout = 128, 4, min(a.timeout, 60.0)
    guest.build(CACHE)
    rows: dict[str, dict[str, Any]] = {}
    load0 = os.getloadavg()
    with Link(RATE_BPS, DELAY_MS, LOSS) as link:
        for rate in rates:
            kib = RATES_KIB[rate]
            for mode in modes:
                root = Path(tempfile.mkdtemp(prefix="live-bench-"))
                log(f"-- {rate} {mode}")
                try:
                    if mode == "dwcp":
                        r = run_dwcp(link, root, kib, a, a.multifd)
                    elif mode == "dwcp-1ch":
                        r = run_dwcp(link, root, kib, a, 0)
                    elif mode == "dwcp-pc":
                        r = run_dwcp(link, root, kib, a, 0, postcopy=True)
                    elif mode == "dwcp-qz":
                        r = run_dwcp(link, root, kib, a, a.multifd, "qemu")
                    else:
                        r = run_native(link, root, kib, mode.split("-")[1], a)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                rows.setdefault(rate, {})[mode] = r
                print_row(rate, mode, r)
        backend = link.backend
    out = {
        "bench": "live",
        "link": {"rate_bps": RATE_BPS, "rtt_ms": 2 * DELAY_MS, "loss": LOSS, "backend": backend},
        "guest": {"memory_mib": a.memory, "disk_mib": a.disk_mib, "ws_mib": a.ws_mib},
        "timeout_s": a.timeout,
        "consensus": a.consensus,
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
        "ratio_dwcp_over_native": ratios(rows),
    }
    for k, v in out["ratio_dwcp_over_native"].items():
        print(f"dwcp / {k}: {_fmt(v, '.3f')}")
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
