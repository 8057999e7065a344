"""``dwcp status``: is the node running, what is it doing, its counters."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dwcp.cli._node import call_node, human_bytes, require_config
from dwcp.node.control import NodeNotRunningError
from dwcp.node.store import Store


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("status", help="node state, transfers, counters")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = require_config(args)
    try:
        st: dict[str, Any] = call_node(config, "status")
        st["running"] = True
    except NodeNotRunningError:
        store = Store(config.data_dir)
        partial = store.partial_transfers() if store.partial_dir.is_dir() else []
        st = {
            "running": False,
            "name": config.name,
            "listen": str(config.listen),
            "partial_transfers": partial,
            "peers": [p.name for p in config.peers],
        }
    if args.json:
        print(json.dumps(st))
        return 0 if st["running"] else 1
    if not st["running"]:
        print(f"node {st['name']}: not running (start it with 'dwcp-node --config {config.path}')")
        if st["partial_transfers"]:
            print(f"  {len(st['partial_transfers'])} partial incoming transfer(s) to resume")
        return 1
    s = st["stats"]
    print(
        f"node {st['name']} ({st['node_id']}) running for {st['uptime_seconds']:.0f} s, "
        f"listening on {st['listen']}"
    )
    print(
        f"  images: {st['images']}, partial transfers: {len(st['partial_transfers'])}, "
        f"peers: {', '.join(st['peers']) or 'none'}"
    )
    print(
        f"  active transfers: in {s['active_transfers']['in']}, out {s['active_transfers']['out']}"
        f", streams {s['streams']}"
    )
    print(
        f"  sent {human_bytes(s['bytes_sent'])}, received {human_bytes(s['bytes_received'])}, "
        f"deduplicated {human_bytes(s['bytes_deduplicated'])}, "
        f"compression x{s['compression_ratio']:.2f}"
    )
    for link in s["links"]:
        rtt = link["rtt_seconds"]
        print(
            f"  link {link['peer']}: {link['streams']} streams, rtt "
            f"{'?' if rtt is None else f'{rtt * 1000:.1f} ms'}"
        )
    c = st.get("consensus")
    if c:
        print(
            f"  ownership cluster: {c['replicas']} replicas (f = {c['f']}), "
            f"{c['connected']} connected"
            + (
                f"; replica {c['replica']} in view {c['view']}, executed {c['executed']}"
                + (", recovering" if c["recovering"] else "")
                if c["replica"] is not None
                else ""
            )
        )
    return 0
