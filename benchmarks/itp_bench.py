"""ITP: one 1 GiB transfer from 4 sources, the scheduler against T* and the naive ways.

    python benchmarks/itp_bench.py [--size-mib 1024] [--seeds 1,2,3] [--json]
    python benchmarks/itp_bench.py --real [--size-mib 64] [--json]   (benchmarks/itp_star.py)

VIRTUAL TIME: this runs ``dwcp.itp.sim`` (seeded sources serving the real scheduler),
not the emulated star of dwcp.netemu, which does not exist yet (dwcp.netemu has a
two-namespace link only). Each source: 10/20/30/40 Mbit/s, 50 ms RTT, 0.5% loss taken
as goodput, +-10% per-second jitter, prior 20% pessimistic. Scenarios: steady; the
fastest drops to a tenth at 30 s; the 30 Mbit/s source dies silently at 30 s; the
20 Mbit/s source lies from 10 s; partial holders (the 10 holds all, the 20 the first
quarter, the 30 the first half, the 40 the middle half). Beside each: the best single
source and an equal split, both computed as their ideal (no RTT, no request gaps, so the
ratios flatter them, not us), and T* from the same effective rates.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from dwcp.itp import RateProfile, bound_profiles, split_chunks
from dwcp.itp.sim import SimSource, simulate

MBIT = 1e6 / 8
DROP_AT = 30.0


def star(size_pieces: int, scenario: str) -> list[SimSource]:
    over: dict[str, dict[str, Any]] = {}
    if scenario == "drop":
        over["s40"] = {"profile": RateProfile(((0, 40 * MBIT), (DROP_AT, 4 * MBIT)))}
    elif scenario == "killed":
        over["s30"] = {"profile": RateProfile(((0, 30 * MBIT), (DROP_AT, 0.0)))}
    elif scenario == "liar":
        over["s20"] = {"lies_from": 10.0}
    elif scenario == "partial":
        n = size_pieces
        over["s20"] = {"holds": frozenset(range(n // 4))}
        over["s30"] = {"holds": frozenset(range(n // 2))}
        over["s40"] = {"holds": frozenset(range(n // 4, 3 * n // 4))}
    out = []
    for mb in (10, 20, 30, 40):
        kw: dict[str, Any] = {"rtt": 0.05, "loss": 0.005, "jitter": 0.1}
        kw.update(over.get(f"s{mb}", {}))
        profile = kw.pop("profile", RateProfile.constant(mb * MBIT))
        out.append(SimSource(f"s{mb}", profile, **kw))
    return out


def naive(sources: list[SimSource], size: int, horizon: float) -> tuple[float, float]:
    """Ideal best-single-source and equal-split makespans (liars and partial holders
    count only for what they can honestly give: best single is over full holders)."""
    profiles = {s.name: s.effective_profile(horizon) for s in sources}
    honest = [s for s in sources if s.lies_from == float("inf")]
    full = [s for s in honest if s.holds is None]
    single = min(bound_profiles([(size, frozenset({s.name}))], profiles) for s in full)
    share = size / len(honest)
    equal = max(bound_profiles([(int(share), frozenset({s.name}))], profiles) for s in honest)
    return single, equal


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, help="default 1024 (virtual), 64 (--real)")
    ap.add_argument("--piece-kib", type=int, default=1024)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--real", action="store_true", help="real daemons through the emulated star (itp_star)"
    )
    ap.add_argument("--scenarios", help="--real: comma-separated subset (steady,single40,...)")
    ap.add_argument("--profile", help="--real: py-spy the destination into PROFILE.SCENARIO.txt")
    args = ap.parse_args()
    if args.real:
        from pathlib import Path

        from itp_star import run_real

        only = frozenset(args.scenarios.split(",")) if args.scenarios else None
        prof = Path(args.profile) if args.profile else None
        out = run_real(args.size_mib or 64, only, prof)
        if args.json:
            print(json.dumps(out))
        return 0
    size = (args.size_mib or 1024) << 20
    chunks = split_chunks(size, args.piece_kib << 10)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, dict[str, Any]] = {}
    print(
        f"{'scenario':9s} {'makespan':>9s} {'T*':>8s} {'ratio':>6s} {'dup %':>6s} "
        f"{'moved s':>7s} {'single':>8s} {'x':>5s} {'equal':>8s} {'x':>5s} ok"
    )
    for scenario in ("steady", "drop", "killed", "liar", "partial"):
        runs = []
        for seed in seeds:
            sources = star(len(chunks), scenario)
            r = simulate(chunks, sources, seed=seed, max_time=2000.0)
            single, equal = naive(sources, size, 2000.0)
            moved = next(
                (
                    t - DROP_AT
                    for t, name, what in r.report.events
                    if scenario in ("drop", "killed") and t >= DROP_AT and name in ("s40", "s30")
                ),
                None,
            )
            runs.append(
                {
                    "seed": seed,
                    "makespan": r.makespan,
                    "bound": r.bound,
                    "ratio": r.ratio,
                    "duplicate_fraction": r.report.duplicate_bytes / size,
                    "moved_after": moved,
                    "single": single,
                    "equal": equal,
                    "correct": r.correct,
                    "excluded": sorted(r.excluded),
                }
            )
        row = {
            "runs": runs,
            "ratio_max": max(x["ratio"] for x in runs),
            "duplicate_max": max(x["duplicate_fraction"] for x in runs),
            "speedup_vs_single_min": min(x["single"] / x["makespan"] for x in runs),
            "speedup_vs_equal_min": min(x["equal"] / x["makespan"] for x in runs),
            "correct": all(x["correct"] for x in runs),
        }
        rows[scenario] = row
        moved_all = [x["moved_after"] for x in runs if x["moved_after"] is not None]
        print(
            f"{scenario:9s} {statistics.median(x['makespan'] for x in runs):9.2f} "
            f"{statistics.median(x['bound'] for x in runs):8.2f} {row['ratio_max']:6.3f} "
            f"{100 * row['duplicate_max']:6.2f} "
            f"{(max(moved_all) if moved_all else float('nan')):7.2f} "
            f"{statistics.median(x['single'] for x in runs):8.2f} "
            f"{row['speedup_vs_single_min']:5.2f} "
            f"{statistics.median(x['equal'] for x in runs):8.2f} "
            f"{row['speedup_vs_equal_min']:5.2f} {row['correct']}"
        )
    print("(virtual time; ratio = worst makespan/T* over seeds; x = worst speed-up)")
    if args.json:
        print(json.dumps({"mode": "virtual-time", "size": size, "seeds": seeds, **rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
