"""``dwcp pull NAME [--from PEER ...]``: fetch an image from several peers at once.

The local node asks every listed peer (default: every peer it knows) for the image's
piece manifest, then pulls distinct pieces from all that hold it, shares set by each
path's predicted and measured rate (``dwcp.itp``). Every piece is checked against the
manifest; a source that sends wrong bytes is excluded. Interrupting the command stops
the pull; re-running it resumes from the pieces already stored. With ``--json`` the
result is one JSON object on stdout's last line (``seconds``, ``sha256``,
``bytes_wire``, ``sources``: bytes and mean rate per source, ``bound_seconds``: T*
from the measured rates, ``duplicate_bytes``). ``--dry-run`` agrees on the manifest and
reports ``bytes_to_send``, ``bytes_resumed`` and ``predicted_seconds`` (PBA's P10 rates),
fetching nothing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dwcp.cli._node import call_node, human_bytes, require_config


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "pull", help="fetch an image from every peer that holds it, split by bandwidth"
    )
    p.add_argument("name", metavar="NAME", help="image name (or its sha256) at the peers")
    p.add_argument(
        "--from",
        dest="sources",
        action="append",
        metavar="PEER",
        help="a peer to pull from (repeat, or PEER,PEER; default: every peer)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="ask the sources for the manifest and report what would be fetched, and how "
        "long it should take; fetch nothing",
    )
    p.add_argument(
        "--equal-split",
        action="store_true",
        help="the naive way, to compare with: one equal contiguous part per source, "
        "no shares by rate and no moved work",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = require_config(args)
    sources = [s for arg in args.sources or [] for s in arg.split(",") if s]
    req = {"name": args.name, "from": sources, "dry_run": args.dry_run}
    if args.equal_split:
        req["equal_split"] = True
    result: dict[str, Any] = call_node(config, "pull", req, timeout=None)
    if args.json:
        print(json.dumps(result))
        return 0
    if args.dry_run:
        print(
            f"would pull {result['name']} ({human_bytes(result['bytes'])}): "
            f"{human_bytes(result['bytes_to_send'])} to fetch, "
            f"{human_bytes(result['bytes_resumed'])} already here from an interrupted pull, "
            f"about {result['predicted_seconds']:.1f} s from {', '.join(result['sources'])}"
        )
        for s, why in sorted(result["excluded"].items()):
            print(f"  {s:<16} not used: {why}")
        if result["exists"]:
            print(f"this node already stores {result['name']}: a real pull would refuse")
        return 0
    print(
        f"pulled {result['name']} ({human_bytes(result['bytes'])}) in {result['seconds']:.2f} s "
        f"(bound {result['bound_seconds']} s), {human_bytes(result['bytes_wire'])} on the wire, "
        f"{human_bytes(result['duplicate_bytes'])} duplicated"
    )
    for s, r in sorted(result["sources"].items()):
        state = r["state"] + (f" ({r['reason']})" if r["reason"] else "")
        print(f"  {s:<16} {human_bytes(r['bytes']):>10}  {human_bytes(r['rate'])}/s  {state}")
    for s, why in sorted(result.get("excluded", {}).items()):
        if s not in result["sources"]:
            print(f"  {s:<16} not used: {why}")
    print(f"sha256 {result['sha256']}")
    return 0
