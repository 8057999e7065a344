"""``dwcp migrate IMAGE --to PEER``: ask the local node to move an image to a peer.

Returns when the destination has verified, stored and indexed the image. A
different image the destination already stores under the same name is replaced
only with ``--force`` (or ``--backup``, which keeps the old one as ``NAME.~N~``),
unless it is an earlier version from the same source file, or the ownership
cluster says this node owns that VM. On a
terminal, a progress bar (bytes, rate, dedup ratio, ETA) runs on stderr (``--quiet``:
none); ``--progress`` without a terminal prints plain lines there instead; with
``--json`` the result is one JSON object on stdout's last line. Interrupting
the command stops the migration; re-running it resumes where it stopped.
``--dry-run`` exchanges the offer and the plan only: it prints what a real run would
send (bytes zero, already at the destination, to send; an estimated time) and sends
nothing else. ``--detach`` starts the migration on the node and returns its job id at
once: closing the CLI then does not stop it (``dwcp jobs`` follows it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dwcp import rates
from dwcp.cli._node import call_node, human_bytes, require_config
from dwcp.errors import MigrationAbortedError
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
        "--dry-run",
        action="store_true",
        help="plan only: what would be sent (zero / already there / to send) and how long",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="start it on the node and return its job id ('dwcp jobs' follows it)",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="IMAGE names a running VM: move it while it runs (disk, RAM, then ownership)",
    )
    p.add_argument(
        "--downtime-limit", type=int, metavar="MS", help="with --live: QEMU's downtime limit"
    )
    p.add_argument(
        "--max-downtime",
        type=int,
        metavar="MS",
        help="with --live: how far the convergence ladder may raise the downtime (default 3000)",
    )
    p.add_argument(
        "--converge-timeout",
        type=float,
        metavar="S",
        help="with --live: abort cleanly (VM stays here) if not converged by then (default 300)",
    )
    p.add_argument(
        "--multifd",
        type=int,
        metavar="N",
        help="with --live: QEMU's multifd channels, each on its own dwcp session (default 0: "
        "QEMU's one stream)",
    )
    p.add_argument(
        "--compress",
        choices=("dwcp", "qemu"),
        help="with --live --multifd: who compresses, the relay (default) or QEMU's zstd-1",
    )
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="with --live: when the convergence ladder is exhausted, switch to postcopy instead "
        "of aborting (the destination runs the VM first; a lost link then loses its state)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        action="store_true",
        help="without a terminal too: a plain progress line on stderr every few seconds",
    )
    shown.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.set_defaults(func=run)


_PLANNED = ("sending", "verifying")  # phases where the dedup ratio is known


PLAIN_INTERVAL = 2.0  # seconds between plain progress lines (a phase change prints at once)


class _Lines:
    """Plain progress lines on stderr for logs and pipes (``--progress`` with no terminal):
    no ANSI codes, binary units, one line per phase change and every PLAIN_INTERVAL."""

    def __init__(self, image: str, peer: str) -> None:
        self.label = f"{Path(image).name} -> {peer}"
        self.t0 = time.monotonic()
        self.last = (-PLAIN_INTERVAL, "")

    def update(self, data: dict[str, Any]) -> None:
        now, phase = time.monotonic(), str(data.get("phase", ""))
        if now - self.last[0] < PLAIN_INTERVAL and phase == self.last[1]:
            return
        self.last = (now, phase)
        line = f"{self.label}: {phase or 'starting'}"
        if "bytes_sent" in data:
            rate = data.get("bytes_wire", 0) / max(now - self.t0, 1e-6)
            line += (
                f", {human_bytes(data['bytes_sent'])} of {human_bytes(data['bytes_to_send'])}"
                f" sent, {human_bytes(rate)}/s on the wire"
            )
            if phase in _PLANNED:
                line += f", {float(data.get('dedup_ratio', 0.0)):.1%} already there"
            if data.get("eta_s") is not None:
                line += f", ETA {float(data['eta_s']):.0f} s"
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


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
    request = {
        "name": args.image,
        "to": args.to,
        "downtime_limit": args.downtime_limit,
        "max_downtime": args.max_downtime,
        "converge_timeout": args.converge_timeout,
        "multifd": args.multifd,
        "compress": args.compress,
        "postcopy": args.postcopy,
    }
    try:
        result: dict[str, Any] = call_node(config, "migrate_live", request)
    except MigrationAbortedError as exc:
        if args.json:  # the contract's last line, then the one-line error on stderr
            print(json.dumps({"name": args.image, "peer": args.to, "live": True,
                              "result": "aborted", "reason": str(exc),
                              "postcopy": False}))  # fmt: skip
        raise
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"live-migrated VM {result['name']} to {result['peer']} in {result['seconds']:.2f} s "
        f"(downtime {result['downtime_ms']:.0f} ms, {human_bytes(result['bytes_wire'])} on the "
        f"wire: RAM {human_bytes(result['bytes_ram'])}, disk {human_bytes(result['bytes_disk'])})"
    )
    if result.get("postcopy"):
        print(f"the guest outran the link: {result['peer']} ran it first and pulled the rest "
              "(postcopy)")  # fmt: skip
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
        "dry_run": args.dry_run,
        "detach": args.detach,
    }
    bar: _Bar | _Lines
    if args.progress and not sys.stderr.isatty():
        bar = _Lines(args.image, args.to)
    else:
        bar = _Bar(args.image, args.to)
        bar.enabled = bar.enabled and not args.quiet
    try:
        result: dict[str, Any] = call_node(config, "migrate", request, on_progress=bar.update)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result))
        return 0
    if result.get("detached"):
        print(
            f"migrating {result['name']} to {result['peer']} as job {result['id']}: "
            f"'dwcp jobs' follows it, 'dwcp jobs cancel {result['id']}' stops it"
        )
        return 0
    if result.get("dry_run"):
        eta = result.get("predicted_seconds")
        print(
            f"dry run: {result['name']} to {result['peer']}: "
            f"{human_bytes(result['bytes_image'])} image, "
            f"{human_bytes(result['bytes_zero'])} zero, "
            f"{human_bytes(result['bytes_local'])} already at {result['peer']}, "
            f"{human_bytes(result['bytes_to_send'])} to send"
            + (f", about {eta:.1f} s" if eta is not None else ", time unknown (no history yet)")
            + "; nothing sent"
        )
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
