"""``dwcp keygen PATH``: create a node key pair."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "keygen", help="write an Ed25519 key pair (PATH mode 0600, PATH.pub)"
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dwcp.identity import NodeKey  # lazy: the other commands start faster

    key = NodeKey.generate()
    key.save(args.path, overwrite=args.force)
    if args.json:
        print(
            json.dumps(
                {
                    "public_key": key.public.text,
                    "node_id": key.node_id,
                    "path": str(args.path),
                    "public_path": f"{args.path}.pub",
                }
            )
        )
    else:
        print(key.public.text)
    return 0
