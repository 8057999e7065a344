"""ITP real mode: `dwcp pull` between real daemons through the emulated star (issue 15).

    python benchmarks/itp_bench.py --real [--size-mib 64] [--json]

Four source daemons, each in its own namespace behind its own link (10/20/30/40 Mbit/s,
25 ms each way = 50 ms RTT, 0.5% loss), one destination daemon in the star's centre.
Each holds the same image; the destination pulls it (`dwcp pull NAME --json`) in the
scenarios: steady (all four), best single source (`--from` the 40 Mbit/s alone), the
equal split (`--equal-split`, the naive way), the fastest dropping to a tenth 3 s in, a
lying source (the 20's copy overwritten under its cached manifest: wrong bytes for the
right hashes), partial holders (the 10/20/30 hold an older version whose second half
differs; pulled by SHA-256) and the 30 Mbit/s daemon SIGKILLed 3 s in (last: it stays
dead). A dry run first has every source hash its copy, so the scenarios time the pull,
not the sources' first manifest. T* is from the links' nominal goodput (rate x
(1 - loss)), with the subsets where sources hold different parts, so it is the bound the
issue means, not one from rates the pull itself measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _nodes import BenchNode

from dwcp.consensus.testing import free_ports
from dwcp.itp import bound as t_star
from dwcp.netemu.params import Direction
from dwcp.netemu.star import Star, dst_addr, src_addr

RATES_MBIT = (10, 20, 30, 40)
LOSS = 0.005
EVENT_AT = 3.0
PY = sys.executable


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far; 0 once it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    """CPU seconds all cores spent busy so far (/proc/stat), to show the machine's load."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _profile(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy (if installed in the venv) sampling the destination daemon, native frames off."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    argv = [spy, "record", "-p", str(pid), "-o", str(out), "--format", "raw", "-r", "100", "-t"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _rewrite(path: Path, data: bytes | None = None) -> bytes:
    """Overwrite ``path`` in place (``data``, or its bytes inverted) keeping its size and
    mtime, so the source's cached manifest still vouches for it; the old bytes back."""
    st = path.stat()
    old = path.read_bytes()
    new = data if data is not None else bytes(b ^ 0x5A for b in old)
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return old


SCENARIOS = ("steady", "single40", "equal", "drop", "lying", "partial", "killed")


def run_real(
    size_mib: int, only: frozenset[str] | None = None, profile: Path | None = None
) -> dict[str, Any]:
    """Run the scenarios (``only``: a subset of SCENARIOS); with ``profile``, py-spy
    samples the destination daemon during each into PROFILE.SCENARIO.txt."""
    size = size_mib << 20
    links = [Direction(mb * 1e6, 25.0, LOSS) for mb in RATES_MBIT]
    goodput = [mb * 1e6 / 8 * (1 - LOSS) for mb in RATES_MBIT]
    names = [f"s{mb}" for mb in RATES_MBIT]
    rate = dict(zip(names, goodput, strict=True))
    root = Path(tempfile.mkdtemp(prefix="itp-star-"))
    rows: dict[str, Any] = {"load_before": os.getloadavg()}
    killed_at: list[float] = []
    try:
        with Star(links) as star:
            port_d, *ports = free_ports(1 + len(links))
            dst = BenchNode(root, "dst", f"0.0.0.0:{port_d}", timeout=900)
            srcs = [BenchNode(root, n, f"{src_addr(i)}:{ports[i]}", 900) for i, n in
                    enumerate(names)]  # fmt: skip
            for i, s in enumerate(srcs):
                s.cli("peers", "add", "dst", f"{dst_addr(i)}:{port_d}", dst.pubkey)
                dst.cli("peers", "add", s.name, f"{src_addr(i)}:{ports[i]}", s.pubkey)
            img = root / "disk.img"
            with open(img, "wb") as f:
                for _ in range(size_mib):
                    f.write(os.urandom(1 << 20))
            want = _sha(img)
            for s in srcs:
                shutil.copyfile(img, s.images / "disk.img")
            dst.start(star, "dst")
            for i, s in enumerate(srcs):
                s.start(star, f"src{i}")
            t0 = time.monotonic()
            dst.cli("pull", "disk.img", "--dry-run", "--json")
            rows["warm_manifests_seconds"] = round(time.monotonic() - t0, 2)

            def pull(scenario: str, *args: str, bound: float, name: str = "disk.img") -> None:
                (dst.images / "disk.img").unlink(missing_ok=True)
                spy = None
                if profile is not None and dst.proc is not None:
                    spy = _profile(dst.proc.pid, profile.with_suffix(f".{scenario}.txt"))
                    time.sleep(1.0)
                nodes = (dst, *srcs)
                cpu0 = [_cpu(n.proc.pid if n.proc else None) for n in nodes]
                busy0 = _machine_busy()
                t0 = time.monotonic()
                out = json.loads(dst.cli("pull", name, *args, "--json").stdout.splitlines()[-1])
                secs = time.monotonic() - t0
                cpu = {
                    n.name: round(_cpu(n.proc.pid if n.proc else None) - c, 2)
                    for n, c in zip(nodes, cpu0, strict=True)
                }
                cpu["machine"] = round(_machine_busy() - busy0, 2)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
                ok = _sha(dst.images / "disk.img") == want
                rows[scenario] = {
                    "seconds": round(secs, 2),
                    "pull_seconds": out["seconds"],
                    "bound_measured": out.get("bound_seconds"),
                    "prior": out.get("prior", {}),
                    "phases": out.get("phases", {}),
                    "bound_nominal": round(bound, 2),
                    "ratio": round(secs / bound, 3),
                    "duplicate_fraction": round(out["duplicate_bytes"] / size, 5),
                    "rejected_bytes": out.get("rejected_bytes", 0),
                    "byte_identical": ok,
                    "cpu_seconds": cpu,
                    "load": os.getloadavg()[0],
                    "events": out.get("events", []),
                    "excluded": out.get("excluded", {}),
                    "sources": {
                        k: (v["bytes"], v["rate"], v["state"]) for k, v in out["sources"].items()
                    },
                }
                print(f"{scenario:8s} {secs:8.2f} s  T* {bound:7.2f} s  x{secs / bound:5.2f}  "
                      f"dup {100 * out['duplicate_bytes'] / size:5.2f}%  ok={ok}  "
                      f"T*(measured rates) {out.get('bound_seconds')} s  prior {out.get('prior')}  "
                      f"phases {rows[scenario]['phases']}  {rows[scenario]['sources']} "
                      f"cpu {cpu} load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

            def run(scenario: str) -> bool:
                return only is None or scenario in only

            def later(what: Any) -> threading.Timer:
                t = threading.Timer(EVENT_AT, what)
                t.start()
                return t

            t_all = size / sum(goodput)
            if run("steady"):
                pull("steady", bound=t_all)
            if run("single40"):
                pull("single40", "--from", "s40", bound=size / goodput[3])
            if run("equal"):
                # The naive way's own bound is the slowest part: (S/4) / 10 Mbit/s.
                pull("equal", "--equal-split", bound=t_all)
                rows["equal"]["own_bound"] = round(size / 4 / goodput[0], 2)
            if run("drop"):
                timer = later(lambda: star.set_rate(3, RATES_MBIT[3] * 1e5))
                # T* with the drop: after EVENT_AT the 40 gives a tenth.
                left = size - EVENT_AT * sum(goodput)
                cap = sum(goodput[:3]) + goodput[3] / 10
                pull("drop", bound=EVENT_AT + max(left, 0) / cap)
                timer.join()
                star.set_rate(3, RATES_MBIT[3] * 1e6)
            if run("lying"):
                liar = srcs[1].images / "disk.img"
                good = _rewrite(liar)
                try:
                    pull("lying", bound=size / sum(goodput[i] for i in (0, 2, 3)))
                finally:
                    _rewrite(liar, good)
            if run("partial"):
                half = (size // 2) & ~((1 << 20) - 1)
                older = img.read_bytes()[:half] + os.urandom(size - half)
                for s in srcs[:3]:
                    (s.images / "disk.img").write_bytes(older)
                groups = [(half, frozenset(names)), (size - half, frozenset({"s40"}))]
                try:
                    dry = dst.cli("pull", want, "--dry-run", "--json").stdout.splitlines()[-1]
                    rows["partial_dry_run"] = json.loads(dry).get("partial", {})
                    pull("partial", bound=t_star(groups, rate), name=want)
                finally:
                    for s in srcs[:3]:
                        shutil.copyfile(img, s.images / "disk.img")
                rows["partial"]["bound_without_subsets"] = round(t_all, 2)
            victim = srcs[2]

            def kill() -> None:
                if victim.proc is not None:
                    killed_at.append(time.time())
                    victim.proc.kill()

            if run("killed"):
                timer = later(kill)
                cap = goodput[0] + goodput[1] + goodput[3]
                pull("killed", bound=EVENT_AT + max(size - EVENT_AT * sum(goodput), 0) / cap)
                timer.join()
                dead = [(t, w) for t, n, w in rows["killed"]["events"] if n == victim.name
                        and w.startswith("dead")]  # fmt: skip
                if killed_at and dead:
                    rows["killed"]["moved_after"] = round(dead[0][0] - killed_at[0], 2)
                    rows["killed"]["moved_event"] = dead[0][1]
                    print(f"killed   work moved {rows['killed']['moved_after']} s after the "
                          f"kill: {dead[0][1]}")  # fmt: skip
            for n in (dst, *srcs):
                if n.proc is not None and n.proc.poll() is None:
                    n.proc.terminate()
                    n.proc.wait(timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"mode": "real-star", "size": size, **rows}
