"""``dwcp images``: the images this node stores, with their SHA-256."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dwcp.cli._node import call_node, human_bytes, require_config
from dwcp.node.control import NodeNotRunningError
from dwcp.node.store import Store


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "images", help="list the images this node stores (name, size, sha256)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = require_config(args)
    try:
        rows: list[dict[str, Any]] = call_node(config, "images", timeout=None)
    except NodeNotRunningError:
        rows = _offline(Store(config.data_dir))
    if args.json:
        print(json.dumps({"images": rows}))
        return 0
    for r in rows:
        print(f"{r['sha256']}  {human_bytes(r['size']):>10}  {r['name']}")
    return 0


def _offline(store: Store) -> list[dict[str, Any]]:
    """Without a running node: index ``images/`` directly (same database the node uses)."""
    from dwcp.delta import ImageIndex

    with ImageIndex(store.index_path) as ix:
        d = store.images_dir.resolve()
        ix.sync_dir(d)
        return [
            {"name": r.path.name, "size": r.size, "sha256": r.sha256, "mtime_ns": r.mtime_ns}
            for r in ix.images()
            if r.path.parent == d
        ]
