"""``dwcp where IMAGE``: the members that hold an image, from the ASS inventories."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dwcp.cli._node import call_node, human_bytes, require_config


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "where", help="the members holding IMAGE, by name or SHA-256 content id (needs gossip.toml)"
    )
    p.add_argument("image", metavar="IMAGE", help="an image name or its SHA-256")
    p.add_argument("--json", action="store_true", help="print a JSON list on the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = require_config(args)
    got: dict[str, Any] = call_node(config, "where", {"image": args.image})
    rows: list[dict[str, Any]] = got["holders"]
    if args.json:
        print(json.dumps(rows))
        return 0
    if not got["enabled"]:
        print(f"gossip is off: no gossip.toml next to {config.path}")
        return 0
    if not rows:
        print(f"no member is known to hold {args.image}")
    for r in rows:
        print(f"{r['member']:<16} {r['name']:<24} {human_bytes(r['size']):>10}  {r['sha256'][:16]}")
    return 0
