"""Helpers shared by the node-facing commands: the config and the control socket."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from dwcp.errors import UsageError
from dwcp.node import control
from dwcp.node.config import NodeConfig, load_config


def require_config(args: argparse.Namespace) -> NodeConfig:
    """The config named by ``--config`` (or ``$DWCP_CONFIG``), loaded and validated."""
    path = args.config or os.environ.get("DWCP_CONFIG")
    if not path:
        raise UsageError(
            "this command needs the node's config: 'dwcp --config DIR/node.toml ...' "
            "(or set DWCP_CONFIG)"
        )
    return load_config(path)


def call_node(config: NodeConfig, op: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
    """Ask the running node; ``NodeNotRunningError`` if it is not running."""
    return control.call(config.control_path, op, args, **kw)


def gossip_rows(
    config: NodeConfig,
    op: str,
    key: str,
    as_json: bool,
    args: dict[str, Any] | None = None,
    **kw: Any,
) -> list[dict[str, Any]] | None:
    """The rows a gossip op answers (under ``key``), or None when they are already printed:
    as one JSON list with ``--json``, or as the one line saying gossip is off."""
    got: dict[str, Any] = call_node(config, op, args, **kw)
    rows: list[dict[str, Any]] = got[key]
    if as_json:
        print(json.dumps(rows))
        return None
    if not got["enabled"]:
        print(f"gossip is off: no gossip.toml next to {config.path}")
        return None
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
