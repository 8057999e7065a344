"""``dwcp paths``: what this node predicts for its path to each peer (PBA, issue 14)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from dwcp.cli._node import require_config
from dwcp.pba.paths import PathStore

COLUMNS = ("p10", "p50", "p90")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "paths",
        help="per peer: predicted bandwidth P10/P50/P90, RTT, loss, samples, age, last errors",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run)


def _mbit(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}"


def run(args: argparse.Namespace) -> int:
    config = require_config(args)
    rows = [r.summary(time.time()) for r in PathStore(config.data_dir / "paths").all()]
    if args.json:
        print(json.dumps({"paths": rows}))
        return 0
    if not rows:
        print("no path history yet: it is recorded from every session to a peer")
        return 0
    print(
        f"{'peer':<20} {'P10':>7} {'P50':>7} {'P90':>7} Mbit/s {'RTT ms':>7} {'loss':>7} "
        f"{'samples':>7} {'age s':>7} {'1s err':>7} {'xfer err':>8}"
    )
    for r in rows:
        e1, et = r["1s_error_median"], r["transfer_error_median"]
        print(
            f"{(r['name'] or r['peer'][:20]):<20} {_mbit(r['p10_bps']):>7} "
            f"{_mbit(r['p50_bps']):>7} "
            f"{_mbit(r['p90_bps']):>7}        {r['rtt_ms'] if r['rtt_ms'] is not None else '-':>7} "
            f"{r['loss'] if r['loss'] is not None else '-':>7} {r['samples']:>7} "
            f"{r['age_s'] if r['age_s'] is not None else '-':>7} "
            f"{'-' if e1 is None else f'{e1:.1%}':>7} {'-' if et is None else f'{et:.1%}':>8}"
        )
    return 0
