"""How far the link emulator (dwcp.netemu) can be trusted, measured with iperf3 and ping.

    python benchmarks/netemu_bench.py [--seconds 10 | --quick] [--json]

Checks: TCP (iperf3, CUBIC, one stream) at 0% loss reaches >= 90% of the rate
at 100 Mbit/s / 50 ms RTT; ping RTT against the configured delay; UDP loss
rate against the configured loss; the highest rate the forwarder sustains
(TCP -P4 at 10 ms RTT, rising rates) and its CPU per packet. Needs root.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from typing import Any

from dwcp.netemu import Link, unavailable_reason


def _iperf3(link: Link, argv: list[str], seconds: float) -> dict[str, Any]:
    server = link.popen_b(
        ["iperf3", "-s", "-1", "-B", link.addr_b],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and server.poll() is None:
        ss = link.run_in_b(["ss", "-Hltn", "sport = :5201"], capture_output=True, text=True)
        if ss.stdout.strip():
            break
        time.sleep(0.05)
    cp = link.run_in_a(
        ["iperf3", "-c", link.addr_b, "-t", str(seconds), "-J", *argv],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    return dict(json.loads(cp.stdout)["end"])


def tcp(rate: float, rtt_ms: float, streams: int, seconds: float) -> dict[str, Any]:
    with Link(rate_bps=rate, delay_ms=rtt_ms / 2, loss=0.0) as link:
        end = _iperf3(link, ["-P", str(streams), "-C", "cubic"], seconds)
        st = link.stats()
    bps = end["sum_received"]["bits_per_second"]
    return {
        "rate_bps": rate,
        "rtt_ms": rtt_ms,
        "streams": streams,
        "goodput_bps": bps,
        "ratio": bps / rate,
        "emu_cpu_us_per_packet": st.cpu_ns_per_packet / 1000,
        "emu_cpu_share": st.cpu_s / st.wall_s,
        "emu_packets_per_s": st.packets / st.wall_s,
        "emu_late_us_mean": st.ab.late_ns_mean / 1000,
        "emu_late_us_max": st.ab.late_ns_max / 1000,
        "queue_drops": st.ab.queue_drops,
        "overflow_drops": st.ab.overflow_drops + st.ba.overflow_drops,
    }


def ping(rtt_ms: float, count: int) -> dict[str, Any]:
    with Link(rate_bps=100e6, delay_ms=rtt_ms / 2) as link:
        out = link.run_in_a(
            ["ping", "-c", str(count), "-i", "0.05", "-W", "5", link.addr_b],
            capture_output=True,
            text=True,
        ).stdout
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    return {
        "rtt_ms": rtt_ms,
        "replies": len(rtts),
        "min_ms": min(rtts),
        "mean_ms": sum(rtts) / len(rtts),
        "max_ms": max(rtts),
    }


def udp_loss(loss: float, seconds: float) -> dict[str, Any]:
    with Link(rate_bps=100e6, delay_ms=10, loss=loss, seed=5) as link:
        end = _iperf3(link, ["-u", "-b", "20M", "-l", "1200"], seconds)
        st = link.stats()
    return {
        "loss": loss,
        "iperf3_lost_percent": end["sum"]["lost_percent"],
        "emu_lost_fraction": st.ab.lost / st.ab.rx_packets,
        "packets": st.ab.rx_packets,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="3 s per measurement")
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line")
    a = ap.parse_args()
    secs = 3.0 if a.quick else a.seconds
    reason = unavailable_reason() or (None if shutil.which("iperf3") else "iperf3 is missing")
    if reason:
        print(f"netemu_bench: skipped: {reason}")
        if a.json:
            print(json.dumps({"skipped": reason}))
        return 0
    out: dict[str, Any] = {"seconds": secs}
    out["tcp_100M_50ms"] = tcp(100e6, 50, 1, secs)
    out["ping"] = [ping(rtt, 20) for rtt in (10, 50, 100)]
    out["udp_loss"] = [udp_loss(p, secs) for p in (0.005, 0.01)]
    out["ramp"] = [tcp(r, 10, 4, secs) for r in (250e6, 500e6, 1e9, 2e9)]

    t = out["tcp_100M_50ms"]
    print(f"\nLink emulator validation, {secs:g} s per measurement")
    print(
        f"TCP CUBIC -P1, 100 Mbit/s 50 ms RTT 0% loss: {t['goodput_bps'] / 1e6:.1f} Mbit/s "
        f"= {t['ratio']:.3f} of the rate; forwarder {t['emu_cpu_us_per_packet']:.1f} us CPU/packet"
    )
    print(f"{'ping RTT set':>14} {'min':>8} {'mean':>8} {'max':>8}   (ms)")
    for p in out["ping"]:
        print(f"{p['rtt_ms']:>14g} {p['min_ms']:>8.2f} {p['mean_ms']:>8.2f} {p['max_ms']:>8.2f}")
    print(f"{'UDP loss set':>14} {'iperf3':>8} {'forwarder':>10} {'packets':>8}")
    for u in out["udp_loss"]:
        print(
            f"{u['loss'] * 100:>13g}% {u['iperf3_lost_percent']:>7.2f}% "
            f"{u['emu_lost_fraction'] * 100:>9.2f}% {u['packets']:>8}"
        )
    print(
        f"{'rate (10 ms RTT)':>16} {'TCP -P4':>9} {'ratio':>6} {'us/pkt':>7} "
        f"{'CPU':>5} {'kpkt/s':>7} {'late us':>8} {'overflow':>8}"
    )
    for r in out["ramp"]:
        print(
            f"{r['rate_bps'] / 1e6:>11g} Mb/s {r['goodput_bps'] / 1e6:>9.1f} {r['ratio']:>6.2f} "
            f"{r['emu_cpu_us_per_packet']:>7.1f} {r['emu_cpu_share'] * 100:>4.0f}% "
            f"{r['emu_packets_per_s'] / 1000:>7.1f} {r['emu_late_us_mean']:>8.1f} "
            f"{r['overflow_drops']:>8}"
        )
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
