"""``dwcp cluster init FILE`` and ``dwcp cluster join``: the PBFT cluster that records
VM ownership.

Every member gets the same file and points ``[consensus] cluster`` at it; the
nodes listed as replicas also set ``[consensus] replica = N`` (N is the position
of their key in ``--replica``). Replicas are clients too unless ``--client`` is
given, so that each node can propose migrations of its own VMs. Before a replica
node's first start, ``dwcp --config NODE.toml cluster join`` creates the replica's
empty log: a node that later finds no log takes it as lost and rejoins without
voting until it has caught up (a fresh log would let it vote twice).

``dwcp cluster add-node NAME PUBKEY HOST:PORT`` and ``cluster remove-node NAME``, run on
any member with ``[consensus]``, commit the fleet's member table (ASS admission,
``dwcp.consensus.members``): every gossiping member admits or drops the node within its
``admission_poll`` (``gossip.toml`` stays the bootstrap set).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from dwcp.errors import UsageError
from dwcp.identity import PublicKey


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "cluster", help="create the consensus cluster file that records VM ownership"
    )
    csub = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    init = csub.add_parser("init", help="write a cluster file (n = 3f+1 replicas)")
    init.add_argument("file", metavar="FILE", help="where to write it (e.g. cluster.json)")
    init.add_argument(
        "--replica",
        action="append",
        required=True,
        metavar="PUBKEY@HOST:PORT",
        help="a replica: the node's public key and a TCP address for consensus "
        "(repeat; 4, 7, 10... replicas)",
    )
    init.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="PUBKEY",
        help="a node allowed to propose (repeat; default: every replica)",
    )
    init.add_argument("--view-change-timeout", type=float, default=1.0, metavar="SECONDS")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=run_init)
    join = csub.add_parser("join", help="before a replica node's first start: create its empty log")
    join.set_defaults(func=run_join)
    add = csub.add_parser(
        "add-node", help="admit a node to the fleet's gossip (committed through PBFT)"
    )
    add.add_argument("name", metavar="NAME", help="the node's name in its own gossip.toml")
    add.add_argument("pubkey", metavar="PUBKEY", help="ed25519:... or a .pub file")
    add.add_argument("address", metavar="HOST:PORT", help="the node's gossip (UDP) address")
    add.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    add.set_defaults(func=run_add_node)
    rm = csub.add_parser(
        "remove-node", help="drop a node from the fleet's gossip (committed through PBFT)"
    )
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    rm.set_defaults(func=run_remove_node)


def run_join(args: argparse.Namespace) -> int:
    from dwcp.cli._node import require_config
    from dwcp.errors import ConfigError
    from dwcp.identity import NodeKey
    from dwcp.node.ownership import Ownership

    config = require_config(args)
    if config.consensus is None:
        raise ConfigError(f"{config.path}: no [consensus] section to join")
    own = Ownership(config.consensus, NodeKey.load(config.key_path), config.data_dir / "consensus")
    wal = own.create_log()
    print(f"replica {config.consensus.replica} joins with an empty log: {wal}")
    return 0


def _replica(text: str) -> tuple[PublicKey, tuple[str, int]]:
    key, sep, addr = text.rpartition("@")
    host, _, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--replica {text}: expected PUBKEY@HOST:PORT")
    return PublicKey.parse(key), (host.strip("[]"), int(port))


def run_init(args: argparse.Namespace) -> int:
    from dwcp.consensus.config import ClusterConfig
    from dwcp.consensus.net import NetConfig

    replicas = [_replica(t) for t in args.replica]
    n = len(replicas)
    if n < 4 or (n - 1) % 3:
        raise UsageError(f"{n} replicas: PBFT needs n = 3f+1 (4, 7, 10...) to survive f faults")
    clients = [PublicKey.parse(t) for t in args.client] or [k for k, _ in replicas]
    out = Path(args.file)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    cfg = ClusterConfig(
        os.urandom(8),
        tuple(k for k, _ in replicas),
        tuple(clients),
        view_change_timeout=args.view_change_timeout,
    )
    NetConfig(cfg, tuple(a for _, a in replicas), owner_check=True).dump(out)
    print(f"wrote {out}: {n} replicas (tolerates f = {cfg.f}), {len(clients)} clients")
    return 0


def run_add_node(args: argparse.Namespace) -> int:
    from dwcp.cli._node import call_node, require_config

    config = require_config(args)
    key = PublicKey.parse(args.pubkey).text  # a .pub file is read here, on the operator's side
    got = call_node(config, "add_node", {"name": args.name, "key": key, "address": args.address})
    if args.json:
        print(json.dumps(got))
    else:
        print(
            f"admitted {got['name']} at {got['address']} (member table version "
            f"{got['version']}); members see it within their admission_poll"
        )
    return 0


def run_remove_node(args: argparse.Namespace) -> int:
    from dwcp.cli._node import call_node, require_config

    config = require_config(args)
    got = call_node(config, "remove_node", {"name": args.name})
    if args.json:
        print(json.dumps(got))
    else:
        print(
            f"removed {got['name']} (member table version {got['version']}); members drop "
            "it within their admission_poll"
        )
    return 0
