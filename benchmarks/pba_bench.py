"""PBA predictor accuracy: traces replayed through the emulated link, three predictors side by side.

    flock /tmp/dwcp-bench.lock python benchmarks/pba_bench.py [--seconds 120] [--json]
    python benchmarks/pba_bench.py --offline [--json]     # the traces themselves, no link
    python benchmarks/pba_bench.py --levels [--json]      # the zstd level cells, modelled
    flock /tmp/dwcp-bench.lock python benchmarks/pba_bench.py --migrate [--json]  # real ones

Migrate (needs root): per link rate (--rates, 10 ms one way, no loss) two fresh
nodes, one warm-up migration so the path has a history, then per image kind
(random; an ext4 image half full of /usr/lib; zero-heavy 4 KiB blocks; sizes
1, 3 and 8 x --mib-per-mbit x rate) ``dwcp migrate`` with its own level choice, at every
--fixed level, and with its choice again; each run a fresh variant of the image
(8 random bytes per non-zero block) so the destination has none of it. The
ratio is the choice's mean seconds over the best fixed level's.

Replay (needs root): for each trace kind (steady, diurnal, step, bursty) a
seeded synthetic trace steps the rate of a ``dwcp.netemu.Link`` (TUN backend,
10 ms one way) once a second while one iperf3 TCP flow (CUBIC) fills it; the
receiver's per-second goodput is the sample sequence. The predictors (ours,
harmonic mean of the last 5, last value) are replayed over those samples:
every 1 s-ahead forecast and every transfer-time prediction (a transfer sized
to take ``--transfer`` s at the mean rate, starting every 2 s after the warm-up)
is written to ``--log`` (JSON lines), then scored. Diurnal traces compress the
day to 600 s so a short replay sees the cycle's slope.

Offline: the same predictors on 1800 s of each trace kind's per-second rate
(seeds 3-5, and 6 held out: never looked at while tuning; seeds 1-2 set the
interval widening), no link, with each trace's oracle floor (see _oracle_ratio).

Targets (issue 14): transfer-time MAPE <= 10% steady/diurnal, <= 20% step/
bursty; 1 s-ahead error >= 15% below HM5; P10-P90 coverage 75-90%.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Any

from dwcp.pba import traces
from dwcp.pba.evaluate import PredictorLike, evaluate
from dwcp.pba.predictor import Baseline, Predictor

IPERF = ["iperf3", "-i", "1", "-l", "8K", "-J", "-C", "cubic", "--get-server-output", "-c"]
PREDICTORS: dict[str, Any] = {
    "pba": Predictor,
    "hm5": lambda: Baseline("hm5"),
    "last": lambda: Baseline("last"),
}


def _score(
    samples: list[float], warmup: int, transfer: float, every: int, log: Any, tag: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, make in PREDICTORS.items():

        def mk(make: Any = make) -> PredictorLike:
            p: PredictorLike = make()
            return p

        ev = evaluate(samples, mk, warmup=warmup, transfer_s=transfer, every=every)
        out[name] = ev.to_json()
        if log is not None:
            for rec in ev.log:
                log.write(json.dumps({**tag, "predictor": name, **rec}) + "\n")
    out["onestep_vs_hm5"] = round(out["pba"]["onestep_mane"] / out["hm5"]["onestep_mane"], 3)
    return out


def _iperf_samples(trace: list[traces.Step], seconds: int, delay_ms: float) -> list[float]:
    from dwcp.netemu import Link
    from dwcp.netemu.trace import TraceReplay

    peak = max(s.rate_bps for s in trace)
    with Link(rate_bps=peak, delay_ms=delay_ms, backend="tun") as link:
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
        with TraceReplay(link, trace):
            cp = link.run_in_a(
                [*IPERF, link.addr_b, "-t", str(seconds)],
                capture_output=True,
                text=True,
                timeout=seconds + 60,
            )
    res = json.loads(cp.stdout)
    server_json = res.get("server_output_json") or {}
    intervals = server_json.get("intervals") or res["intervals"]
    return [float(iv["sum"]["bits_per_second"]) for iv in intervals][:seconds]


def offline(args: argparse.Namespace) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for kind in traces.KINDS:
        for seed in _seeds(args.seeds):
            s = traces.per_second(traces.generate(kind, seconds=1800, seed=seed))
            cell = _score(s, 120, args.transfer, 5, None, {})
            cell["oracle_vs_hm5"] = _oracle_ratio(kind, s, seed)
            cells[f"{kind}/{seed}"] = cell
    return {"mode": "offline", "transfer_s": args.transfer, "cells": cells}


def _seeds(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _noiseless(kind: str, seconds: int, seed: int, mean: float = 50e6) -> list[float]:
    """The rate ``traces.generate`` draws before its per-second jitter (same random stream:
    every draw is replayed, the jitter's value dropped)."""
    rng = random.Random(f"{kind}:{seed}")
    out: list[float] = []
    if kind == "steady":
        return [mean] * seconds
    if kind == "diurnal":
        phase = rng.uniform(0, 2 * math.pi)
        for t in range(seconds):
            rng.gauss(1.0, 0.04)
            out.append(mean * (1.0 + 0.4 * math.sin(2 * math.pi * t / 3600.0 + phase)))
    elif kind == "step":
        levels = (0.5, 0.75, 1.0, 1.3)
        level = rng.choice(levels)
        dwell = rng.expovariate(1 / traces.DWELL_S)
        for _ in range(seconds):
            if dwell <= 0:
                level = rng.choice([x for x in levels if x != level])
                dwell = rng.expovariate(1 / traces.DWELL_S)
            dwell -= 1
            rng.gauss(1.0, 0.03)
            out.append(mean * level)
    else:
        burst, depth, bad = 0, 1.0, False
        for _ in range(seconds):
            if burst == 0 and rng.random() < 1 / 25:
                burst = rng.randint(2, 6)
                depth = rng.uniform(0.25, 0.6)
            bad = rng.random() < (0.7 if bad else 0.03)
            share = depth if burst else 1.0
            burst = max(burst - 1, 0)
            rng.gauss(1.0, 0.05)
            out.append(mean * share)
    return out


def _oracle_ratio(kind: str, samples: list[float], seed: int) -> float:
    """1 s error of a predictor that knows the trace's noiseless rate (every level shift and
    burst, none of the jitter), over HM5's: a floor no predictor can beat on that trace. The
    jitter is drawn independently each second, so nothing can forecast it; on steady traces
    the floor is 1/sqrt(1 + 1/5) = 0.913 (HM5 averages 5 draws of the same jitter)."""
    clean = _noiseless(kind, len(samples), seed)
    hm, orc = [], []
    for t in range(120, len(samples)):
        x, r = samples[t], samples[t - 5 : t]
        hm.append(abs(5 / sum(1 / v for v in r) - x) / x)
        orc.append(abs(clean[t] - x) / x)
    hm.sort()
    orc.sort()
    return round(orc[len(orc) // 2] / hm[len(hm) // 2], 3)


def replay(args: argparse.Namespace) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(args.log, "w")) if args.log else None
        for kind in traces.KINDS:
            trace = traces.generate(
                kind, seconds=args.seconds, mean_bps=args.mean, seed=args.seed, period_s=600
            )
            samples = _iperf_samples(trace, args.seconds, args.delay)
            tag = {"trace": kind, "seed": args.seed}
            if log is not None:
                for t, (st, x) in enumerate(zip(trace, samples, strict=False)):
                    log.write(
                        json.dumps({**tag, "t": t, "trace_bps": st.rate_bps, "got": x}) + "\n"
                    )
            warm = args.seconds // 3
            cell = _score(samples, warm, args.transfer, 2, log, tag)
            got = sum(samples) / len(samples)
            want = sum(s.rate_bps for s in trace[: len(samples)]) / len(samples)
            cell["goodput_share_of_trace"] = round(got / want, 3)
            cells[kind] = cell
    return {
        "mode": "replay",
        "seconds": args.seconds,
        "mean_bps": args.mean,
        "delay_ms": args.delay,
        "transfer_s": args.transfer,
        "cells": cells,
    }


# --- the starting zstd level ---------------------------------------------------

SEND_CPU_S_PER_GB = 42.9  # dwcp sender, 1 conn x 1 stream, uvloop (RESULTS.md CPU table)
FRAME = 1 << 20  # dwcp.delta.frames.BATCH_BYTES


def _data(kind: str, size: int, seed: int) -> bytes:
    """random; system files (what an ext4 system image holds); zero-heavy 4 KiB blocks."""
    if kind == "random":
        return random.Random(seed).randbytes(size)
    files = bytearray()
    for root in ("/usr/lib/python3", "/usr/share/doc", "/usr/bin", "/usr/lib/x86_64-linux-gnu"):
        for dirpath, _, names in sorted(os.walk(root)):
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    with contextlib.suppress(OSError), open(p, "rb") as f:
                        files += f.read(size - len(files))
                if len(files) >= size:
                    break
            if len(files) >= size:
                break
    if kind == "system":
        return bytes(files[:size])
    rng = random.Random(seed)
    out = bytearray(size)
    for off in range(0, size, 4096):  # a few hundred bytes of metadata per block, zeros after
        n = rng.randint(64, 512)
        src = rng.randrange(0, len(files) - n)
        out[off : off + n] = files[src : src + n]
    return bytes(out)


def _pipeline(frames: list[tuple[float, int]], rate_bps: float, send_s_per_b: float) -> float:
    """Seconds for frames (encode CPU s, wire bytes): encoder thread, then sender + link."""
    enc = sent = 0.0
    for cpu, wire in frames:
        enc += cpu
        sent = max(sent, enc) + max(wire * 8 / rate_bps, wire * send_s_per_b)
    return sent


def levels(args: argparse.Namespace) -> dict[str, Any]:
    import zstandard

    from dwcp.pba.zlevel import LEVELS, choose_level, measure_levels, sample

    send = SEND_CPU_S_PER_GB / 1e9
    cells: dict[str, Any] = {}
    for kind in ("random", "system", "zeroheavy"):
        data = _data(kind, args.size << 20, args.seed)
        per_level: dict[int, list[tuple[float, int]]] = {}
        for level in LEVELS:  # the whole image at every level: the hindsight side
            cctx = zstandard.ZstdCompressor(level=level)
            frames = []
            for i in range(0, len(data), FRAME):
                t0 = time.thread_time()
                wire = len(cctx.compress(data[i : i + FRAME]))
                frames.append((time.thread_time() - t0, wire))
            per_level[level] = frames
        costs = measure_levels(sample(data))  # what the chooser sees: 4 MiB, measured apart
        for rate in (10e6, 50e6, 200e6):
            times = {lv: _pipeline(fr, rate, send) for lv, fr in per_level.items()}
            best = min(times, key=lambda lv: times[lv])
            choice = choose_level(costs, rate, send_cpu_s_per_byte=send, nbytes=len(data))
            cells[f"{kind}/{rate / 1e6:g}M"] = {
                "chosen": choice.level,
                "bound": choice.bound,
                "chosen_s": round(times[choice.level], 3),
                "best_fixed": best,
                "best_fixed_s": round(times[best], 3),
                "ratio": round(times[choice.level] / times[best], 3),
                "level3_s": round(times[3], 3),
            }
    return {
        "mode": "levels",
        "size_mib": args.size,
        "send_cpu_s_per_gb": SEND_CPU_S_PER_GB,
        "cells": cells,
    }


# --- the level cells as real migrations (--migrate) ------------------------------------


def _variant(src: bytes, seed: int) -> bytes:
    """``src`` with 8 random bytes at the start of every non-zero 4 KiB block: each run's
    image is new to the destination (which would otherwise send nothing the second time)
    while its compressibility stays that of ``src`` (8 of 4096 bytes)."""
    rng = random.Random(seed)
    out = bytearray(src)
    zero = bytes(4096)
    for off in range(0, len(out), 4096):
        if out[off : off + 4096] != zero[: len(out) - off]:
            out[off : off + 8] = rng.randbytes(8)
    return bytes(out)


# Image size per kind, in units of --mib-per-mbit x rate: each takes a few seconds on its
# link (a compressible image puts fewer bytes on the wire), so no cell is all start-up.
KIND_SCALE = {"random": 1, "system": 3, "zeroheavy": 8}


def _migrate_images(work: Any, unit_mib: int, seed: int) -> dict[str, bytes]:
    """random bytes; an ext4 image (mkfs.ext4 -d) half full of /usr/lib; zero-heavy blocks."""
    from dwcp.demo import build_ext4, stage_tree

    size_mib = unit_mib * KIND_SCALE["system"]
    size = size_mib << 20
    tree, img = work / "tree", work / "system.img"
    budget = size // 2
    while True:  # stage_tree copies whole files, so it may overshoot what fits
        stage_tree(tree, budget, sources=("/usr/lib",), seed=seed)
        try:
            build_ext4(img, size_mib, tree)
            break
        except subprocess.CalledProcessError:
            if budget < size // 16:
                raise
            budget = budget * 3 // 4
        finally:
            shutil.rmtree(tree)
    system = img.read_bytes()
    img.unlink()
    return {
        "random": random.Random(seed).randbytes(unit_mib * KIND_SCALE["random"] << 20),
        "system": system,
        "zeroheavy": _data("zeroheavy", unit_mib * KIND_SCALE["zeroheavy"] << 20, seed),
    }


def _chosen_levels(log_path: Any, skip: int) -> tuple[list[int], int]:
    """The levels of the last ``out_ok`` event in node a's JSON log after line ``skip``."""
    lines = log_path.read_text().splitlines()
    levels: list[int] = []
    for line in lines[skip:]:
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if ev.get("event") == "out_ok":
                levels = list(ev.get("levels") or [])
    return levels, len(lines)


def _migrate_once(nodes: Any, work: Any, image: bytes, run: int, level: int | None) -> float:
    """One ``dwcp migrate`` of a fresh variant of ``image``; its JSON ``seconds``."""
    from migrate_bench import dwcp

    img = work / f"run-{run}.img"
    img.write_bytes(_variant(image, run))
    argv = ["--config", str(nodes.cfg["a"]), "migrate", str(img), "--to", "b"]
    argv += ["--name", img.name, "--json"]
    if level is not None:
        argv += ["--level", str(level)]
    out = json.loads(dwcp(*argv).stdout.strip().splitlines()[-1])
    img.unlink()
    return float(out["seconds"])


def migrate_levels(args: argparse.Namespace) -> dict[str, Any]:
    """Per link rate: fresh nodes, one warm-up migration so the path has a history, then
    per image: adaptive (what dwcp chooses), fixed levels, adaptive again; total seconds
    of each ``dwcp migrate`` (its JSON ``seconds``), each run a fresh variant."""
    import tempfile
    from pathlib import Path

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from migrate_bench import Nodes  # a sibling script

    from dwcp.netemu import Link

    fixed = [int(x) for x in args.fixed.split(",")]
    rates = [float(x) * 1e6 for x in args.rates.split(",")]
    cells: dict[str, Any] = {}
    runs = itertools.count(1)
    for rate in rates:
        size_mib = max(5, round(args.mib_per_mbit * rate / 1e6))
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            work = Path(tmp)
            images = _migrate_images(work, size_mib, args.seed)
            with Link(rate_bps=rate, delay_ms=args.delay, loss=0.0, seed=args.seed) as link:
                nodes = Nodes(link, work)
                alog = next((work / "a").rglob("node.log"))  # its JSON log

                try:
                    _migrate_once(
                        nodes, work, images["random"], next(runs), None
                    )  # warm-up: the path history the choice reads
                    for kind in images:
                        _, skip = _chosen_levels(alog, 0)
                        chosen = [_migrate_once(nodes, work, images[kind], next(runs), None)]
                        levels_a, skip = _chosen_levels(alog, skip)
                        times = {
                            lv: _migrate_once(nodes, work, images[kind], next(runs), lv)
                            for lv in fixed
                        }
                        chosen.append(_migrate_once(nodes, work, images[kind], next(runs), None))
                        levels_b, _ = _chosen_levels(alog, skip)
                        best = min(times, key=lambda lv: times[lv])
                        mean = sum(chosen) / len(chosen)
                        cell = {
                            "mib": len(images[kind]) >> 20,
                            "chosen_s": [round(t, 2) for t in chosen],
                            "chosen_levels": [levels_a, levels_b],
                            "fixed_s": {str(lv): round(t, 2) for lv, t in times.items()},
                            "best_fixed": best,
                            "best_fixed_s": round(times[best], 2),
                            "ratio": round(mean / times[best], 3),
                        }
                        cells[f"{kind}/{rate / 1e6:g}M"] = cell
                        print(f"  {kind}/{rate / 1e6:g}M {cell}", file=sys.stderr, flush=True)
                finally:
                    nodes.stop()
    return {
        "mode": "migrate",
        "delay_ms": args.delay,
        "mib_per_mbit": args.mib_per_mbit,
        "fixed": fixed,
        "cells": cells,
    }


def _migrate_table(out: dict[str, Any]) -> None:
    print(
        f"{'cell':<16} {'MiB':>4} {'chosen s':>12} {'levels':>14} {'best':>4} {'best s':>7} ratio"
    )
    for cell, r in out["cells"].items():
        ch = "/".join(f"{t:.2f}" for t in r["chosen_s"])
        lv = "/".join(",".join(map(str, x[:1] + x[-1:])) for x in r["chosen_levels"])
        print(
            f"{cell:<16} {r['mib']:>4} {ch:>12} {lv:>14} {r['best_fixed']:>4} "
            f"{r['best_fixed_s']:>7.2f} {r['ratio']:.3f}"
        )


def _levels_table(out: dict[str, Any]) -> None:
    head = ["chosen", "bound", "s", "best", "best s", "ratio", "L3 s"]
    print(f"{'cell':<16} " + " ".join(f"{h:>6}" for h in head))
    for cell, r in out["cells"].items():
        print(
            f"{cell:<16} {r['chosen']:>6} {r['bound']:>6} {r['chosen_s']:>6.2f} "
            f"{r['best_fixed']:>6} {r['best_fixed_s']:>6.2f} {r['ratio']:>6.3f} "
            f"{r['level3_s']:>6.2f}"
        )


def _table(out: dict[str, Any]) -> None:
    print(f"{'cell':<14} {'pred':<5} {'1s MANE':>8} {'xfer MAPE':>10} {'P10-P90':>8} {'n':>4}")
    for cell, row in out["cells"].items():
        for name in PREDICTORS:
            r = row[name]
            print(
                f"{cell:<14} {name:<5} {r['onestep_mane']:>8.3f} {r['transfer_mape']:>10.3f} "
                f"{r['p10_p90_coverage']:>8.2f} {r['transfers']:>4}"
            )
        extra = (
            f"  (goodput/trace {row['goodput_share_of_trace']})"
            if "goodput_share_of_trace" in row
            else ""
        )
        print(f"{'':<14} pba/hm5 1 s error ratio {row['onestep_vs_hm5']}{extra}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--offline", action="store_true", help="score the traces themselves, no link")
    ap.add_argument("--levels", action="store_true", help="the starting zstd level's cells")
    ap.add_argument("--size", type=int, default=32, help="--levels: MiB of data per kind")
    ap.add_argument(
        "--migrate", action="store_true", help="the level cells as real migrations (root)"
    )
    ap.add_argument("--rates", default="10,50,200", help="--migrate: link rates, Mbit/s")
    ap.add_argument("--fixed", default="1,2,3,4,5,6,7,8,9", help="--migrate: fixed levels")
    ap.add_argument("--mib-per-mbit", type=float, default=0.5, help="--migrate: image size")
    ap.add_argument("--workdir", default=None, help="--migrate: where images are written")
    ap.add_argument("--seconds", type=int, default=120, help="replay length per trace kind")
    ap.add_argument("--mean", type=float, default=30e6, help="trace mean rate, bit/s")
    ap.add_argument("--delay", type=float, default=10.0, help="one-way delay, ms")
    ap.add_argument("--transfer", type=float, default=20.0, help="transfer length at mean rate, s")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument(
        "--seeds",
        default="3,4,5,6",
        help="--offline: trace seeds (1-2 set the constants; 6 is held out: never tuned on)",
    )
    ap.add_argument("--log", default="/tmp/pba_predictions.jsonl", help="JSON lines; '' = none")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.offline and args.transfer == 20.0:
        args.transfer = 60.0
    load0 = os.getloadavg()[0]
    if args.migrate:
        out = migrate_levels(args)
        out["load"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        _migrate_table(out)
        if args.json:
            print(json.dumps(out))
        return 0
    if args.levels:
        out = levels(args)
        out["load"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        _levels_table(out)
        if args.json:
            print(json.dumps(out))
        return 0
    if args.offline:
        out = offline(args)
    else:
        from dwcp.netemu import unavailable_reason

        why = unavailable_reason() or (None if shutil.which("iperf3") else "needs iperf3")
        if why:
            print(
                f"pba_bench: cannot replay through the link: {why} (try --offline)", file=sys.stderr
            )
            return 2
        out = replay(args)
    out["load"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    _table(out)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
