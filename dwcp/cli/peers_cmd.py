"""``dwcp peers [add NAME HOST:PORT PUBKEY | remove NAME]``: list, trust or forget peers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dwcp.cli._node import call_node, require_config
from dwcp.node.config import Peer, append_peer, load_config, remove_peer
from dwcp.node.control import NodeNotRunningError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "peers", help="list trusted peers (with reachability if the node runs), or add one"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run_list)
    psub = p.add_subparsers(dest="peers_command", metavar="add|remove")
    a = psub.add_parser("add", help="trust a peer: NAME HOST:PORT PUBKEY")
    a.add_argument("name", metavar="NAME")
    a.add_argument("address", metavar="HOST:PORT")
    a.add_argument("public_key", metavar="PUBKEY", help="'ed25519:...' or a .pub file")
    a.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    a.set_defaults(func=run_add)
    r = psub.add_parser("remove", help="stop trusting a peer: NAME (the running node reloads)")
    r.add_argument("name", metavar="NAME")
    r.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    r.set_defaults(func=run_remove)


def _reload(path: object) -> bool:
    """Tell a running node to re-read its config; False if it is not running."""
    try:
        call_node(load_config(str(path)), "reload")
    except NodeNotRunningError:
        return False
    return True


def _report(peer: Peer, live: bool, as_json: bool, text: str) -> None:
    """One result line for ``peers add``/``remove``: the JSON shape both share, or ``text``."""
    if as_json:
        doc = {
            "name": peer.name,
            "address": str(peer.address),
            "public_key": peer.public_key.text,
            "node_reloaded": live,
        }
        print(json.dumps(doc))
    else:
        print(text)


def run_remove(args: argparse.Namespace) -> int:
    config = require_config(args)
    peer = remove_peer(config, args.name)
    live = _reload(config.path)
    _report(peer, live, args.json, f"no longer trusting peer {peer.name} at {peer.address}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    config = require_config(args)
    peer = append_peer(config, args.name, args.address, args.public_key)
    live = _reload(config.path)
    text = f"trusting peer {peer.name} at {peer.address} (node id {peer.public_key.node_id})"
    _report(peer, live, args.json, text)
    return 0


def run_list(args: argparse.Namespace) -> int:
    config = require_config(args)
    try:
        rows = call_node(config, "peers", timeout=30)
        running = True
    except NodeNotRunningError:
        running = False
        rows = [
            {
                "name": p.name,
                "address": str(p.address),
                "public_key": p.public_key.text,
                "node_id": p.public_key.node_id,
                "reachable": None,
                "connect_seconds": None,
            }
            for p in config.peers
        ]
    if args.json:
        print(json.dumps({"node_running": running, "peers": rows}))
        return 0
    if not rows:
        print("no peers; add one with 'dwcp --config FILE peers add NAME HOST:PORT PUBKEY'")
    for r in rows:
        if r["reachable"] is None:
            state = "unknown (node not running)"
        elif r["reachable"]:
            state = f"reachable ({r['connect_seconds'] * 1000:.1f} ms to connect)"
        else:
            state = "unreachable"
        print(f"{r['name']:<16} {r['address']:<22} {r['node_id']}  {state}")
    return 0
