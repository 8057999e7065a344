"""``dwcp members``: the fleet as this node sees it (ASS membership, SWIM + Lifeguard)."""

from __future__ import annotations

import argparse
from typing import Any

from dwcp.cli._node import gossip_rows, require_config


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "members", help="every admitted member: state, incarnation, last heard (needs gossip.toml)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON list on the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = require_config(args)
    rows = gossip_rows(config, "members", "members", args.json)
    if rows is None:
        return 0
    print(f"{'NAME':<16} {'ADDRESS':<22} {'STATE':<8} {'INC':>5} {'HEARD':>8}  IMAGES")
    for r in rows:
        heard = "self" if r["self"] else ("-" if r["heard_s"] is None else f"{r['heard_s']:.1f}s")
        images = ", ".join(r.get("images", [])) or "-"
        print(
            f"{r['name']:<16} {r['address']:<22} {r['state']:<8} {r['incarnation']:>5} "
            f"{heard:>8}  {images}"
        )
    return 0
