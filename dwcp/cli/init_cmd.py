"""``dwcp init DIR --listen HOST:PORT``: a new node directory (config, key, data)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dwcp.errors import UsageError
from dwcp.identity import NodeKey
from dwcp.node.config import NAME_RE, load_config, parse_address, starter_config
from dwcp.node.store import Store


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "init", help="create DIR/node.toml, a node key and the data directory"
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="UDP address to serve")
    p.add_argument("--name", help="the node's name in logs (default: DIR's name)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    d = Path(args.dir).resolve()
    cfg = d / "node.toml"
    if cfg.exists():
        raise UsageError(f"{cfg} already exists; this directory is already a node")
    try:
        listen = parse_address(args.listen, default_port=None)
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from None
    name = args.name or (d.name if NAME_RE.match(d.name) else "node")
    if not NAME_RE.match(name):
        raise UsageError(f"--name {name!r}: expected letters, digits, '.', '_' or '-'")
    d.mkdir(parents=True, exist_ok=True)
    key = NodeKey.generate()
    key.save(d / "node.key")
    tmp = cfg.with_suffix(".toml.tmp")
    tmp.write_text(starter_config(listen, name), encoding="utf-8")
    tmp.replace(cfg)
    config = load_config(cfg)
    Store(config.data_dir).create()
    if args.json:
        print(
            json.dumps(
                {
                    "config": str(cfg),
                    "public_key": key.public.text,
                    "node_id": key.node_id,
                    "listen": str(listen),
                }
            )
        )
    else:
        print(f"node {name} initialised in {d}; trust it on peers with:", file=sys.stderr)
        print(
            f"  dwcp --config PEER/node.toml peers add {name} {listen} {key.public.text}",
            file=sys.stderr,
        )
        print(key.public.text)
    return 0
