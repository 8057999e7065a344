"""Goodput over the emulated WAN: dwcp vs one plain aioquic connection vs iperf3 TCP.

    python benchmarks/transport_bench.py [--seconds 10 | --quick] [--json]
    python benchmarks/transport_bench.py --loopback [--loopback-bytes 200M] [--runs 3] [--json]
    python benchmarks/transport_bench.py --flood [--hellos 3000] [--flood-seconds 7] [--json]
    python benchmarks/transport_bench.py --warm-start [--seconds 10] [--runs 3] [--json]
        [--warm-interval 0.1]

Each cell gets a fresh dwcp.netemu.Link (same seed, so the same loss pattern)
per tool; each tool runs for --seconds and reports received bytes over its own
transfer time (slow start included). Ratios are goodput / link rate. Needs root
(network namespaces); prints why and exits 0 when it cannot run.

``--loopback`` (no root): the efficiency cell of issue 17. One --loopback-bytes
transfer on 127.0.0.1 per run, dwcp (``dwcp perf``, its defaults) and plain
aioquic (``aioquic_peer.py --bytes``, one stream, both on uvloop) alternating
for --runs runs; CPU-s per GB at the sender and at the receiver, each side's
``time.process_time`` over its transfer only, and goodput; medians.

``--flood`` (loopback, no root): a ``dwcp perf`` server's RSS and a 4 MiB
transfer's time, alone and while this process sends --hellos ClientHellos over
--flood-seconds (issue 19 item 7); the ratio is flooded / quiet transfer time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwcp.netemu import Link, unavailable_reason
from dwcp.pba.parallelism import LinkSample
from dwcp.pba.paths import PathRecord, to_seconds

HERE = Path(__file__).resolve().parent
PORT = 4433
# Prepended to every endpoint command; ["chrt", "-f", "1"] with --rt (see main()).
ENDPOINT: list[str] = []


@dataclass(frozen=True)
class Cell:
    rate_bps: float
    rtt_ms: float
    loss: float

    @property
    def label(self) -> str:
        return f"{self.rate_bps / 1e6:g} Mbit/s {self.rtt_ms:g} ms {self.loss * 100:g}%"


CELLS = [
    Cell(100e6, 50, 0.0),
    Cell(100e6, 50, 0.005),
    Cell(100e6, 50, 0.01),
    Cell(100e6, 100, 0.005),
]
TOOLS = ["dwcp", "aioquic", "iperf3 -P1", "iperf3 -P8"]


def _wait_port(link: Link, proto: str, port: int, proc: subprocess.Popen[Any]) -> None:
    """Wait (bounded) until something listens on ``port`` in namespace b."""
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = link.run_in_b(["ss", flag, f"sport = :{port}"], capture_output=True, text=True)
        if out.stdout.strip():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.args}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {proto}/{port} after 20 s")


def run_iperf3(link: Link, seconds: float, streams: int) -> dict[str, Any]:
    server = link.popen_b(
        [*ENDPOINT, "iperf3", "-s", "-1", "-B", link.addr_b, "-p", "5201"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(link, "tcp", 5201, server)
    argv = ["iperf3", "-c", link.addr_b, "-p", "5201", "-t", str(seconds), "-P", str(streams)]
    cp = link.run_in_a(
        [*ENDPOINT, *argv, "-C", "cubic", "-J"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    end = json.loads(cp.stdout)["end"]
    return {
        "goodput_bps": end["sum_received"]["bits_per_second"],
        "retransmits": end["sum_sent"].get("retransmits"),
    }


def run_aioquic(link: Link, seconds: float) -> dict[str, Any]:
    peer = str(HERE / "aioquic_peer.py")
    server = link.popen_b(
        [
            *ENDPOINT,
            sys.executable,
            peer,
            "server",
            link.addr_b,
            str(PORT),
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.DEVNULL,
    )
    _wait_port(link, "udp", PORT, server)
    argv = [sys.executable, peer, "client", link.addr_b, str(PORT)]
    cp = link.run_in_a([*ENDPOINT, *argv], capture_output=True, text=True, timeout=seconds + 90)
    if cp.returncode != 0:
        raise RuntimeError(f"aioquic client failed: {cp.stderr.strip()[-500:]}")
    return dict(json.loads(cp.stdout.strip().splitlines()[-1]))


def dwcp_perf_available() -> bool:
    return importlib.util.find_spec("dwcp.cli.perf_cmd") is not None


def run_dwcp(link: Link, seconds: float, keys: Path) -> dict[str, Any]:
    dwcp = [sys.executable, "-m", "dwcp"]
    ka, kb = keys / "a.key", keys / "b.key"
    listen = [*dwcp, "perf", "--listen", f"{link.addr_b}:{PORT}"]
    server = link.popen_b(
        [*ENDPOINT, *listen, "--key", str(kb), "--trust", f"{ka}.pub"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(link, "udp", PORT, server)
    argv = [*dwcp, "perf", f"{link.addr_b}:{PORT}", "--key", str(ka), "--trust", f"{kb}.pub"]
    argv += ["--seconds", str(seconds), "--json"]
    cp = link.run_in_a([*ENDPOINT, *argv], capture_output=True, text=True, timeout=seconds + 90)
    if cp.returncode != 0:
        raise RuntimeError(f"dwcp perf failed: {cp.stderr.strip()[-500:]}")
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    return {k: out.get(k) for k in ("goodput_bps", "rtt_ms", "loss", "connections", "streams")}


def measure(cell: Cell, tool: str, seconds: float, keys: Path) -> dict[str, Any]:
    with Link(rate_bps=cell.rate_bps, delay_ms=cell.rtt_ms / 2, loss=cell.loss, seed=1) as link:
        if tool == "dwcp":
            res = run_dwcp(link, seconds, keys)
        elif tool == "aioquic":
            res = run_aioquic(link, seconds)
        else:
            res = run_iperf3(link, seconds, int(tool.split("-P")[1]))
        st = link.stats()
    res["ratio"] = res["goodput_bps"] / cell.rate_bps
    res["emulator"] = {
        "cpu_us_per_packet": round(st.cpu_ns_per_packet / 1000, 2),
        "overflow_drops": st.ab.overflow_drops + st.ba.overflow_drops,
        "late_us_mean": round(st.ab.late_ns_mean / 1000, 1),
        "queue_drops": st.ab.queue_drops,
        "lost": st.ab.lost + st.ba.lost,
    }
    return res


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _perf_client(port: int, keys: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "dwcp", "perf", f"127.0.0.1:{port}", "--bytes", "4M"]
    argv += ["--key", str(keys / "a.key"), "--trust", f"{keys / 'b.key'}.pub", "--json"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_client(proc: subprocess.Popen[str], started: float, ended: float) -> dict[str, Any]:
    """The client's result; its wall time runs from ``started`` to ``ended``."""
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        return {"error": err.strip()[-300:]}
    res = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": round(ended - started, 3), "transfer_s": round(res["seconds"], 3)}


def _transfers(port: int, keys: Path, count: int) -> list[dict[str, Any]]:
    """``count`` 4 MiB transfers one after the other."""
    out = []
    for _ in range(count):
        t = time.monotonic()
        proc = _perf_client(port, keys)
        proc.wait(timeout=300)
        out.append(_finish_client(proc, t, time.monotonic()))
    return out


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = sorted(r[key] for r in runs if key in r)
    return values[len(values) // 2] if values else None


def run_flood(hellos: int, seconds: float) -> dict[str, Any]:
    """Server RSS and 4 MiB transfers, quiet, then back to back under a ClientHello flood."""
    from dwcp.transport.testing import HelloFlood

    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        for name in ("a", "b"):
            subprocess.run(
                [sys.executable, "-m", "dwcp", "keygen", str(keys / f"{name}.key")],
                check=True,
                capture_output=True,
            )
        listen = [sys.executable, "-m", "dwcp", "perf", "--listen", f"127.0.0.1:{PORT}"]
        listen += ["--key", str(keys / "b.key"), "--trust", f"{keys / 'a.key'}.pub"]
        server = subprocess.Popen(listen, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert server.stdout is not None
            server.stdout.readline()  # "dwcp perf listening on ..."
            rss_start = _proc_kib(server.pid, "VmRSS")
            quiet = _transfers(PORT, keys, 3)
            rss_quiet = _proc_kib(server.pid, "VmRSS")
            cpu_before = _cpu_s(server.pid)
            flood = HelloFlood(("127.0.0.1", PORT), answer=False)
            flooded: list[dict[str, Any]] = []
            client: subprocess.Popen[str] | None = None
            client_t = 0.0
            t0 = time.monotonic()
            while flood.sent < hellos:  # paced: hellos spread evenly over the seconds
                if client is not None and client.poll() is not None:
                    flooded.append(_finish_client(client, client_t, time.monotonic()))
                    client = None
                if client is None and flood.sent >= hellos // 7 and flood.sent < hellos * 6 // 7:
                    client, client_t = _perf_client(PORT, keys), time.monotonic()
                due = t0 + seconds * flood.sent / hellos
                if time.monotonic() < due:
                    flood.pump()
                    time.sleep(min(0.002, max(0.0, due - time.monotonic())))
                    continue
                flood.hello()
            flood_s = time.monotonic() - t0
            rss_flood = _proc_kib(server.pid, "VmRSS")
            cpu_flood = _cpu_s(server.pid) - cpu_before
            if client is not None:
                client.wait(timeout=300)
                flooded.append(_finish_client(client, client_t, time.monotonic()))
            flood.close()
            time.sleep(1.0)
            after = _transfers(PORT, keys, 3)
            peak = _proc_kib(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait(timeout=30)
    q, f = _median(quiet, "transfer_s"), _median(flooded, "transfer_s")
    return {
        "hellos": hellos,
        "flood_s": round(flood_s, 2),
        "quiet": quiet,
        "flooded": flooded,
        "after": after,
        "slowdown": round(f / q, 2) if q and f else None,
        "server_cpu_s_during_flood": round(cpu_flood, 2),
        "server_rss_mib": {
            "start": round(rss_start / 1024, 1),
            "after_quiet_transfers": round(rss_quiet / 1024, 1),
            "after_flood": round(rss_flood / 1024, 1),
            "peak": round(peak / 1024, 1),
        },
    }


LOOP_PORT = 47433  # above the kernel's ephemeral range, like the loopback tests' ports
_SERVER_CPU = re.compile(r"received (\d+) bytes in ([\d.]+) s .*cpu ([\d.]+) s")


def _keygen(keys: Path) -> None:
    for name in ("a", "b"):
        subprocess.run(
            [sys.executable, "-m", "dwcp", "keygen", str(keys / f"{name}.key")],
            check=True,
            capture_output=True,
        )


def _per_gb(cpu: float, nbytes: int) -> float:
    return round(cpu / max(nbytes, 1) * 1e9, 2)


def loop_dwcp(nbytes: int, keys: Path) -> dict[str, Any]:
    """One ``dwcp perf --bytes`` transfer over loopback; both ends' CPU over the transfer."""
    dwcp = [sys.executable, "-m", "dwcp", "perf"]
    listen = [*dwcp, "--listen", f"127.0.0.1:{LOOP_PORT}", "--key", str(keys / "b.key")]
    server = subprocess.Popen(
        [*listen, "--trust", f"{keys / 'a.key'}.pub"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if not server.stdout.readline().startswith("dwcp perf listening"):
            raise RuntimeError("dwcp perf --listen did not start (is the port taken?)")
        argv = [*dwcp, f"127.0.0.1:{LOOP_PORT}", "--key", str(keys / "a.key")]
        argv += ["--trust", f"{keys / 'b.key'}.pub", "--bytes", str(nbytes), "--json"]
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if cp.returncode != 0:
            raise RuntimeError(f"dwcp perf failed: {cp.stderr.strip()[-300:]}")
        out = json.loads(cp.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    m = _SERVER_CPU.search(err)
    if m is None:
        raise RuntimeError(f"no receiver report from dwcp perf --listen: {err.strip()[-300:]}")
    return {
        "goodput_bps": out["goodput_bps"],
        "sender_s_per_gb": _per_gb(out["cpu_seconds"], out["bytes"]),
        "receiver_s_per_gb": _per_gb(float(m.group(3)), int(m.group(1))),
        "connections": out.get("connections"),
        "streams": out.get("streams"),
        "bytes_per_packet": round(out["bytes"] / max(1, out.get("packets_sent") or 1)),
    }


def loop_aioquic(nbytes: int) -> dict[str, Any]:
    """One ``aioquic_peer.py --bytes`` transfer over loopback (uvloop at both ends)."""
    peer = [sys.executable, str(HERE / "aioquic_peer.py")]
    where = ["127.0.0.1", str(LOOP_PORT + 1), "--bytes", str(nbytes), "--uvloop"]
    server = subprocess.Popen(
        [*peer, "server", *where], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("aioquic_peer.py server did not start (is the port taken?)")
        cp = subprocess.run([*peer, "client", *where], capture_output=True, text=True, timeout=300)
        if cp.returncode != 0:
            raise RuntimeError(f"aioquic client failed: {cp.stderr.strip()[-300:]}")
        out = json.loads(cp.stdout.strip().splitlines()[-1])
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.terminate()
        server.communicate(timeout=30)
    return {
        "goodput_bps": out["goodput_bps"],
        "sender_s_per_gb": _per_gb(out["sender_cpu_seconds"], out["bytes"]),
        "receiver_s_per_gb": _per_gb(out["cpu_seconds"], out["bytes"]),
    }


def run_loopback(nbytes: int, runs: int) -> dict[str, Any]:
    """``runs`` alternating dwcp / aioquic transfers; medians per tool and dwcp/aioquic ratios."""
    per_tool: dict[str, list[dict[str, Any]]] = {"dwcp": [], "aioquic": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        _keygen(keys)
        for i in range(runs):
            for tool in ("dwcp", "aioquic") if i % 2 == 0 else ("aioquic", "dwcp"):
                try:
                    r = loop_dwcp(nbytes, keys) if tool == "dwcp" else loop_aioquic(nbytes)
                except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as e:
                    r = {"error": str(e)}
                per_tool[tool].append(r)
                print(f"  run {i + 1} {tool:<8} {r}", file=sys.stderr)
    keys_ = ("goodput_bps", "sender_s_per_gb", "receiver_s_per_gb")
    med = {t: {k: _median(rs, k) for k in keys_} for t, rs in per_tool.items()}
    ratio = {
        k: round(d / a, 3) if d and a else None
        for k in keys_
        for d, a in [(med["dwcp"][k], med["aioquic"][k])]
    }
    load = [round(x, 2) for x in (*load_before, *os.getloadavg())]
    return {
        "bytes": nbytes,
        "runs": per_tool,
        "median": med,
        "dwcp_over_aioquic": ratio,
        "loadavg_before_after": load,
    }


def _loopback_main(a: argparse.Namespace) -> int:
    text = a.loopback_bytes.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    res = run_loopback(int(float(text.rstrip("KMG")) * mult), a.runs)
    print(f"\nLoopback efficiency, {res['bytes']} bytes per transfer, median of {a.runs} runs")
    print(f"{'tool':<10} {'goodput Mbit/s':>15} {'sender CPU-s/GB':>16} {'receiver CPU-s/GB':>18}")
    for tool, m in [*res["median"].items(), ("dwcp/aioq", res["dwcp_over_aioquic"])]:
        g = m["goodput_bps"]
        gs = "n/a" if g is None else (f"{g:.2f}x" if tool == "dwcp/aioq" else f"{g / 1e6:.1f}")
        print(f"{tool:<10} {gs:>15} {m['sender_s_per_gb']!s:>16} {m['receiver_s_per_gb']!s:>18}")
    print(f"load average (1/5/15 min) before, after: {res['loadavg_before_after']}")
    if a.json:
        print(json.dumps({"loopback": res}))
    return 0


def _flood_main(a: argparse.Namespace) -> int:
    res = run_flood(a.hellos, a.flood_seconds)
    rss = res["server_rss_mib"]
    print(f"\nClientHello flood: {res['hellos']} hellos in {res['flood_s']} s, loopback")
    print(f"{'4 MiB transfers':<18} {'runs':>4} {'median s':>9} {'median wall s':>14} errors")
    for label in ("quiet", "flooded", "after"):
        runs = res[label]
        errors = sum("error" in r for r in runs)
        med, wall = _median(runs, "transfer_s"), _median(runs, "wall_s")
        print(f"{label:<18} {len(runs):>4} {med!s:>9} {wall!s:>14} {errors}")
    print(f"slowdown under the flood (median transfer time): {res['slowdown']}x")
    print(f"server CPU during the flood: {res['server_cpu_s_during_flood']} s")
    print(
        f"server RSS MiB: start {rss['start']}, after quiet transfers "
        f"{rss['after_quiet_transfers']}, after flood {rss['after_flood']}, peak {rss['peak']}"
    )
    if a.json:
        print(json.dumps({"flood": res}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each cell")
    ap.add_argument("--quick", action="store_true", help="3 s per cell")
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of tools")
    ap.add_argument(
        "--rt",
        action="store_true",
        help="run every endpoint at SCHED_FIFO 1 (chrt): measures the protocols, not the "
        "machine's scheduling latency, which on a loaded host caps paced Python senders",
    )
    ap.add_argument("--flood", action="store_true", help="ClientHello flood (loopback)")
    ap.add_argument("--hellos", type=int, default=3000, help="ClientHellos in the flood")
    ap.add_argument("--flood-seconds", type=float, default=7.0, help="duration of the flood")
    ap.add_argument("--loopback", action="store_true", help="loopback CPU-s/GB cell (issue 17)")
    ap.add_argument("--loopback-bytes", default="200M", help="bytes per loopback transfer")
    ap.add_argument(
        "--warm-start",
        action="store_true",
        help="PBA: time to 90%% of final goodput, probing from 1 connection vs a known path",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=3,
        help="--warm-start: cold/warm pairs; --loopback: alternating dwcp/aioquic runs",
    )
    ap.add_argument(
        "--warm-interval",
        type=float,
        default=0.1,
        help="--warm-start: timeline (and policy) interval in s, every arm",
    )
    a = ap.parse_args()
    if a.loopback:
        return _loopback_main(a)
    if a.flood:
        return _flood_main(a)
    if a.warm_start:
        why = unavailable_reason()
        if why:
            print(f"transport_bench: skipped: {why}")
            return 0
        ws = warm_start(a.seconds, a.runs, a.warm_interval)
        print(
            f"{'run':>3} {'cold t90 s':>10} {'level':>6} {'level t90':>9} "
            f"{'resume Mbit/s':>13} {'warm t90 s':>10} {'speedup':>8}"
        )
        for i, r in enumerate(ws["runs"]):
            lv = "x".join(map(str, r["warm_level"]))
            print(
                f"{i:>3} {r['cold_t90_s']:>10} {lv:>6} {r['level_t90_s']:>9} "
                f"{r['resume_bps'] / 1e6:>13.1f} {r['warm_t90_s']:>10} {r['speedup']:>8}"
            )
        print(f"median speedup {ws['median_speedup']} ({ws['cell']}, {ws['seconds']} s each)")
        lost = [(r["cold_lost_s"], r["warm_lost_s_at_cold_final"]) for r in ws["runs"]]
        print(f"seconds lost to the start, cold/warm: {lost}; median ratio ")
        print(f"  {ws['median_lost_ratio']:.2f}")
        if a.json:
            print(json.dumps({"warm_start": ws}))
        return 0
    if a.rt:
        ENDPOINT[:] = ["chrt", "-f", "1"]
    seconds = 3.0 if a.quick else a.seconds
    reason = unavailable_reason() or (None if shutil.which("iperf3") else "iperf3 is missing")
    if reason:
        print(f"transport_bench: skipped: {reason}")
        if a.json:
            print(json.dumps({"skipped": reason}))
        return 0
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    have_dwcp = dwcp_perf_available()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        if have_dwcp and "dwcp" in tools:
            for name in ("a", "b"):
                subprocess.run(
                    [sys.executable, "-m", "dwcp", "keygen", str(keys / f"{name}.key")],
                    check=True,
                    capture_output=True,
                )
        for cell in CELLS:
            row: dict[str, Any] = {}
            for tool in tools:
                if tool == "dwcp" and not have_dwcp:
                    row[tool] = {"error": "dwcp perf is not available yet"}
                    continue
                try:
                    row[tool] = measure(cell, tool, seconds, keys)
                except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as e:
                    row[tool] = {"error": str(e)}
                print(f"  {cell.label:<26} {tool:<11} {_fmt(row[tool])}", file=sys.stderr)
            results[cell.label] = row
    _table(results, tools, seconds, a.rt)
    if a.json:
        print(json.dumps({"seconds": seconds, "rt": a.rt, "results": results}))
    return 0


def _fmt(r: dict[str, Any]) -> str:
    if "goodput_bps" not in r:
        return "n/a"
    return f"{r['goodput_bps'] / 1e6:6.1f} ({r['ratio']:.2f})"


def _table(results: dict[str, dict[str, Any]], tools: list[str], seconds: float, rt: bool) -> None:
    how = ", endpoints at SCHED_FIFO" if rt else ""
    print(f"\nGoodput in Mbit/s (ratio to link rate), {seconds:g} s per cell, emulated link{how}")
    print(f"{'link':<26}" + "".join(f"{t:>16}" for t in tools))
    for label, row in results.items():
        print(f"{label:<26}" + "".join(f"{_fmt(row.get(t, {})):>16}" for t in tools))
    errors = {
        f"{t}: {row[t]['error']}" for row in results.values() for t in row if "error" in row[t]
    }
    for err in sorted(errors):
        print(f"  n/a {err}")


# --- warm start on a known path (PBA, issue 14) ---------------------------------------

WARM_CELL = Cell(100e6, 50, 0.005)


def time_to_share(
    timeline: list[dict[str, Any]], share: float = 0.9, smooth: int = 3
) -> tuple[float, float]:
    """(seconds until goodput first reaches ``share`` of the final, final goodput): the
    final is the median of the last third of the timeline's per-interval goodput; goodput
    is the mean of the last ``smooth`` intervals (at 0.1 s one interval's goodput swings
    40-170 Mbit/s on a 100 Mbit/s link: ACKs and window updates arrive in bursts)."""
    rates = [float(p["goodput_bps"]) for p in timeline]
    if not rates:
        raise ValueError("dwcp perf reported no timeline")
    tail = sorted(rates[len(rates) * 2 // 3 :])
    final = tail[len(tail) // 2]
    for i, p in enumerate(timeline):
        window = rates[max(0, i - smooth + 1) : i + 1]
        if sum(window) / len(window) >= share * final:
            return float(p["t"]), final
    return float(timeline[-1]["t"]), final


def seconds_lost(timeline: list[dict[str, Any]], final: float) -> float:
    """How much longer than a sender at ``final`` from its first interval's start the
    session took for the bytes it moved: the cost of its start, free of interval noise."""
    if not timeline or final <= 0:
        return float("nan")
    bits, last = 0.0, 0.0
    for p in timeline:
        t = float(p["t"])
        bits += float(p["goodput_bps"]) * (t - last)
        last = t
    return last - bits / final


def _perf_run(
    link: Link,
    seconds: float,
    keys: Path,
    conns: int,
    streams: int,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    dwcp = [sys.executable, "-m", "dwcp"]
    ka, kb = keys / "a.key", keys / "b.key"
    listen = [*dwcp, "perf", "--listen", f"{link.addr_b}:{PORT}"]
    server = link.popen_b(
        [*ENDPOINT, *listen, "--key", str(kb), "--trust", f"{ka}.pub"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(link, "udp", PORT, server)
        argv = [*dwcp, "perf", f"{link.addr_b}:{PORT}", "--key", str(ka), "--trust", f"{kb}.pub"]
        argv += ["--seconds", str(seconds), "--json", "--rtt", str(WARM_CELL.rtt_ms / 1000)]
        argv += ["--connections", str(conns), "--streams", str(streams), *extra]
        cp = link.run_in_a([*ENDPOINT, *argv], capture_output=True, text=True, timeout=seconds + 90)
    finally:
        server.terminate()
        server.wait(timeout=10)
    if cp.returncode != 0:
        raise RuntimeError(f"dwcp perf failed: {cp.stderr.strip()[-500:]}")
    out: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    return out


def resume_hint(timeline: list[dict[str, Any]]) -> tuple[float, float] | None:
    """What the path store would hand the next session after this one (the per-interval
    timeline merged into seconds, as ``PeerSessions`` records it): (rate bit/s, RTT s)."""
    samples, last = [], 0.0
    for p in timeline:
        t = float(p["t"])
        samples.append(
            LinkSample(
                t, t - last, float(p["goodput_bps"]), float(p["rtt_ms"]) / 1000,
                float(p["loss"]), int(p["connections"]), int(p["streams"]),
            )
        )  # fmt: skip
        last = t
    now = time.time()
    return PathRecord("bench", seconds=to_seconds(samples, now)).resume_hint(now)


def warm_start(seconds: float, runs: int, interval: float = 0.1) -> dict[str, Any]:
    """Per pair: cold (today's probing from 1 connection x 2 streams), "level" (starting at
    the connections x streams the cold session's policy ended on) and warm (that level plus
    the careful resume of the congestion controller from the rate and RTT the cold session
    measured), which together are what the path store hands a new session
    (``PeerSessions.warm_config``). ``interval`` is the timeline's (and the policy's) period
    in every arm: 0.1 s, as at 0.5 s the best t90 after a handshake is one whole interval."""
    pairs = []
    every = ("--interval", str(interval))
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        for name in ("a", "b"):
            subprocess.run(
                [sys.executable, "-m", "dwcp", "keygen", str(keys / f"{name}.key")],
                check=True,
                capture_output=True,
            )
        c = WARM_CELL
        for _ in range(runs):
            with Link(rate_bps=c.rate_bps, delay_ms=c.rtt_ms / 2, loss=c.loss, seed=1) as link:
                cold = _perf_run(link, seconds, keys, 1, 2, every)
            # The level the session ended on (its policy's last decision), which is what
            # the path store records; "connections" is the most it ever opened.
            end = cold.get("decision") or cold
            level = (int(end["connections"]), int(end["streams"]))
            hint = resume_hint(cold["timeline"])
            if hint is None:
                raise RuntimeError("the cold session left too little history for a resume")
            resume = ("--resume-bps", str(round(hint[0])), "--resume-rtt", f"{hint[1]:.4f}")
            with Link(rate_bps=c.rate_bps, delay_ms=c.rtt_ms / 2, loss=c.loss, seed=1) as link:
                lvl = _perf_run(link, seconds, keys, *level, every)
            with Link(rate_bps=c.rate_bps, delay_ms=c.rtt_ms / 2, loss=c.loss, seed=1) as link:
                warm = _perf_run(link, seconds, keys, *level, every + resume)
            tc, fc = time_to_share(cold["timeline"])
            tl, _ = time_to_share(lvl["timeline"])
            tw, fw = time_to_share(warm["timeline"])
            tx = _time_to(warm["timeline"], 0.9 * fc)  # against cold's final, not its own
            lost_c = seconds_lost(cold["timeline"], fc)
            lost_w = seconds_lost(warm["timeline"], fc)
            pairs.append(
                {
                    "cold_t90_s": round(tc, 2),
                    "cold_final_bps": round(fc),
                    "warm_level": list(level),
                    "level_t90_s": round(tl, 2),
                    "resume_bps": round(hint[0]),
                    "resume_rtt_ms": round(hint[1] * 1000, 2),
                    "warm_t90_s": round(tw, 2),
                    "warm_final_bps": round(fw),
                    "warm_t90_of_cold_final_s": round(tx, 2),
                    "cold_lost_s": round(lost_c, 2),
                    "warm_lost_s_at_cold_final": round(lost_w, 2),
                    "warm_first_s_bps": round(_first_second(warm["timeline"])),
                    "cold_first_s_bps": round(_first_second(cold["timeline"])),
                    "speedup": round(tc / max(tw, 1e-3), 2),
                    "resume": warm.get("resume"),
                }
            )
            print(f"  warm start: {pairs[-1]}", file=sys.stderr)
    sp = sorted(p["speedup"] for p in pairs)
    return {
        "cell": WARM_CELL.label,
        "seconds": seconds,
        "interval_s": interval,
        "runs": pairs,
        "median_speedup": sp[len(sp) // 2],
        "median_lost_ratio": sorted(
            p["cold_lost_s"] / max(p["warm_lost_s_at_cold_final"], 1e-3) for p in pairs
        )[len(pairs) // 2],
    }


def _time_to(timeline: list[dict[str, Any]], bps: float, smooth: int = 3) -> float:
    """Seconds until the goodput (mean of ``smooth`` intervals) first reached ``bps``."""
    rates = [float(p["goodput_bps"]) for p in timeline]
    for i, p in enumerate(timeline):
        window = rates[max(0, i - smooth + 1) : i + 1]
        if sum(window) / len(window) >= bps:
            return float(p["t"])
    return float(timeline[-1]["t"]) if timeline else float("inf")


def _first_second(timeline: list[dict[str, Any]]) -> float:
    """Mean goodput over the timeline's first second."""
    pts = [p for p in timeline if float(p["t"]) <= 1.0 + 1e-6]
    return sum(float(p["goodput_bps"]) for p in pts) / max(len(pts), 1)


if __name__ == "__main__":
    sys.exit(main())
