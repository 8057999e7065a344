"""``dwcp migrate IMAGE --to PEER``: ask the local node to move an image to a peer.

Returns when the destination has verified, stored and indexed the image. A
different image the destination already stores under the same name is replaced
only with ``--force`` (or ``--backup``, which keeps the old one as ``NAME.~N~``),
unless it is an earlier version from the same source file, or the ownership
cluster says this node owns that VM. On a
terminal, a progress bar (bytes, rate, dedup ratio, ETA) runs on stderr; with
``--json`` the result is one JSON object on stdout's last line. Interrupting
the command stops the migration; re-running it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dwcp import rates
from dwcp.cli._node import call_node, human_bytes, require_config
from dwcp.rates import rate_arg


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "migrate", help="move an image to a peer, sending only what it lacks"
    )
    p.add_argument("image", metavar="IMAGE", help="image file (raw, qcow2, ...) or stored name")
    p.add_argument("--to", required=True, metavar="PEER", help="a peer name from 'dwcp peers'")
    p.add_argument("--name", help="name at the destination (default: IMAGE's file name)")
    p.add_argument("--bwlimit", metavar="RATE", type=rate_arg, help=f"as rsync's: {rates.EXAMPLES}")
    p.add_argument(
        "--level",
        type=int,
        metavar="N",
        help="zstd level, fixed (default: adaptive 1-9, from the config's level)",
    )
    keep = p.add_mutually_exclusive_group()
    keep.add_argument(
        "--force",
        action="store_true",
        help="replace a different image the peer already stores under that name",
    )
    keep.add_argument(
        "--backup",
        action="store_true",
        help="replace it, keeping the old one at the peer as NAME.~N~",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="IMAGE names a running VM: move it while it runs (disk, RAM, then ownership)",
    )
    p.add_argument(
        "--downtime-limit", type=int, metavar="MS", help="with --live: QEMU's downtime limit"
    )
    p.add_argument("--postcopy", action="store_true", help="with --live: allow postcopy")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run)


_PLANNED = ("sending", "verifying")  # phases where the dedup ratio is known


class _Bar:
    """A rich progress bar fed by the node's progress lines (only on a terminal).

    rich is imported only then: scripts (``--json``, no terminal) start faster.
    """

    def __init__(self, image: str, peer: str) -> None:
        self.enabled = sys.stderr.isatty()
        self.progress: Any = None
        self.task: Any = None
        self.label = f"{Path(image).name} -> {peer}"

    def update(self, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TextColumn("dedup {task.fields[dedup]:>5.1%}"),
                TextColumn("{task.fields[phase]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=None, dedup=0.0, phase="")
        assert self.task is not None
        total = data.get("bytes_to_send")
        self.progress.update(
            self.task,
            total=total
            if data.get("phase") not in (None, "claiming", "connecting", "scanning", "planning")
            else None,
            completed=data.get("bytes_sent", 0),
            dedup=float(data.get("dedup_ratio", 0.0)) if data.get("phase") in _PLANNED else 0.0,
            phase=str(data.get("phase", "")),
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def run_live(args: argparse.Namespace) -> int:
    """``migrate --live VM --to PEER``: returns when the VM runs at PEER."""
    config = require_config(args)
    if args.postcopy:
        print("dwcp: --postcopy is not supported yet; run without it", file=sys.stderr)
        return 2
    request = {"name": args.image, "to": args.to, "downtime_limit": args.downtime_limit}
    result: dict[str, Any] = call_node(config, "migrate_live", request)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"live-migrated VM {result['name']} to {result['peer']} in {result['seconds']:.2f} s "
        f"(downtime {result['downtime_ms']:.0f} ms, {human_bytes(result['bytes_wire'])} on the "
        f"wire: RAM {human_bytes(result['bytes_ram'])}, disk {human_bytes(result['bytes_disk'])})"
    )
    if result.get("owner"):
        print(f"VM {result['name']} now owned by {result['peer']} (epoch {result['epoch']})")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.live:
        return run_live(args)
    config = require_config(args)
    image = Path(args.image)
    target = str(image.resolve()) if image.exists() else args.image
    request = {
        "image": target,
        "to": args.to,
        "name": args.name,
        "bwlimit": args.bwlimit,
        "level": args.level,
        "force": args.force,
        "backup": args.backup,
    }
    bar = _Bar(args.image, args.to)
    try:
        result: dict[str, Any] = call_node(config, "migrate", request, on_progress=bar.update)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result))
        return 0
    saved = result["bytes_image"] - result["bytes_wire"]
    print(
        f"migrated {result['name']} to {result['peer']} in {result['seconds']:.2f} s: "
        f"{human_bytes(result['bytes_image'])} image, {human_bytes(result['bytes_wire'])} on the "
        f"wire ({result['dedup_ratio']:.1%} already at the destination, "
        f"{human_bytes(max(saved, 0))} saved)",
        file=sys.stdout,
    )
    print(f"sha256 {result['sha256']} verified by {result['peer']}")
    if result.get("owner"):
        print(f"VM {result['name']} now owned by {result['peer']} (epoch {result['epoch']})")
    return 0
