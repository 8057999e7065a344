"""Nightly-style seed sweep of the consensus simulator's recovery schedules (issue 19 item 9).

CI runs a few seeds of each simulated scenario (tests/consensus); held-out seeds
found bugs CI's counts missed (amnesia seeds 696 and 1335). This runs a large,
resumable batch of one scenario in chunks, prints a table and, with ``--json``,
ONE JSON object on the last line: seeds run, failures (with their seeds), and
seconds. It measures correctness, not speed; run it under the bench lock so long
batches do not collide with measurements:

    flock /tmp/dwcp-bench.lock python benchmarks/consensus_seeds.py --scenario amnesia \
        --start 0 --count 1500 [--json]

A failing seed replays with ``DWCP_SEED=<seed> pytest tests/consensus/test_sim_recovery.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "consensus"))

from test_sim_recovery import check_votes_again

SCENARIOS = {
    "amnesia": lambda seed: check_votes_again(seed, amnesia=True),
    "wal": lambda seed: check_votes_again(seed, amnesia=False),
}


def sweep(scenario: str, start: int, count: int) -> dict[str, Any]:
    run = SCENARIOS[scenario]
    failures: dict[int, str] = {}
    t0 = time.perf_counter()
    for seed in range(start, start + count):
        try:
            run(seed)
        except AssertionError as exc:
            failures[seed] = str(exc).splitlines()[0][:200]
    seconds = time.perf_counter() - t0
    return {
        "scenario": scenario,
        "start": start,
        "count": count,
        "failed": len(failures),
        "failed_seeds": sorted(failures),
        "first_errors": {str(k): v for k, v in sorted(failures.items())[:5]},
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="amnesia")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = sweep(args.scenario, args.start, args.count)
    print(f"{'scenario':<10} {'seeds':>12} {'failed':>7} {'seconds':>8}  failed seeds")
    span = f"{args.start}..{args.start + args.count - 1}"
    print(
        f"{res['scenario']:<10} {span:>12} {res['failed']:>7} {res['seconds']:>8}  "
        f"{res['failed_seeds'] or '-'}"
    )
    if args.json:
        print(json.dumps(res, sort_keys=True))
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
