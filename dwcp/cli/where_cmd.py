"""``dwcp where IMAGE``: the members that hold an image, from the ASS inventories; for an
image file given by path, how much of its content each member holds."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from dwcp.cli._node import gossip_rows, human_bytes, require_config
from dwcp.gossip.where_content import ASK_TIMEOUT
from dwcp.migrate.multi import build_manifest
from dwcp.node.pulls import PULL_PIECE


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "where",
        help="the members holding IMAGE, by name or SHA-256 content id; for a file path, how "
        "much of its content each member holds (needs gossip.toml)",
    )
    p.add_argument(
        "image",
        metavar="IMAGE",
        help="an image name or its SHA-256; an existing regular file is taken as a path",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list on the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = require_config(args)
    if os.path.isfile(args.image):
        return _by_content(config, Path(args.image), args.json)
    rows = gossip_rows(config, "where", "holders", args.json, {"image": args.image})
    if rows is None:
        return 0
    if not rows:
        print(f"no member is known to hold {args.image}")
    for r in rows:
        print(f"{r['member']:<16} {r['name']:<24} {human_bytes(r['size']):>10}  {r['sha256'][:16]}")
    return 0


def _by_content(config: Any, path: Path, as_json: bool) -> int:
    """Hash the file here (not in the node), then ask the node to compare with members."""
    m = build_manifest(path, path.name, PULL_PIECE)
    req = {"name": m.name, "size": m.size, "piece": m.piece, "hashes": list(m.hashes)}
    rows = gossip_rows(config, "where_content", "members", as_json, req, timeout=ASK_TIMEOUT * 6)
    if rows is None:
        return 0
    print(f"{path} ({human_bytes(m.size)}):")
    for r in rows:
        held = human_bytes(r["bytes"]) if r["state"] == "ok" else "unreachable"
        extra = ", ".join(r["images"]) if r["state"] == "ok" else r.get("reason", "")
        print(f"{r['member']:<16} {held:>12} {r['share']:>7.1%}  {extra}")
    return 0
