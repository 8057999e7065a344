"""``dwcp owner VM``: which node owns a VM, as committed by the PBFT cluster."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dwcp.cli._node import call_node, require_config


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "owner", help="the node that owns a VM and its epoch (needs [consensus])"
    )
    p.add_argument("vm", metavar="VM", help="the VM's name (the image name used by migrate)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = require_config(args)
    got: dict[str, Any] = call_node(config, "owner", {"vm": args.vm})
    if args.json:
        print(json.dumps(got))
    elif got["owner"] is None:
        print(f"VM {got['vm']} is not registered")
    else:
        who = got["owner_name"] or "an unknown node"
        print(f"VM {got['vm']} is owned by {who} (node {got['owner']}), epoch {got['epoch']}")
    return 0
