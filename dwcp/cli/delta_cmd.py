"""``dwcp delta`` and ``dwcp patch``: delta files for disk images (HDE).

Like ``zstd --patch-from`` or rsync batch files, but matching 4 KiB blocks of
disk images first. Output contract (stable): with ``--json`` one JSON object on
the last line with the figures printed in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any


def register(sub: Any) -> None:
    d: argparse.ArgumentParser = sub.add_parser(
        "delta", help="write a self-contained delta of NEW against base image(s)"
    )
    d.add_argument("new", metavar="NEW")
    d.add_argument(
        "--base",
        action="append",
        required=True,
        metavar="OLD",
        help="an image the receiver has (repeatable)",
    )
    d.add_argument("-o", "--output", required=True, metavar="FILE")
    d.add_argument("--level", type=int, default=1, help="zstd level (default 1; 3+ for slow links)")
    d.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="compression threads (default: up to 2)",
    )
    d.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    d.set_defaults(func=run_delta)

    p: argparse.ArgumentParser = sub.add_parser(
        "patch", help="rebuild an image from a delta file and its base image(s)"
    )
    p.add_argument("delta", metavar="FILE")
    p.add_argument("--base", action="append", default=[], metavar="OLD")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run_patch)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def run_delta(args: argparse.Namespace) -> int:
    from dwcp.delta import make_delta  # lazy: the other commands start faster

    st = make_delta(args.new, args.base, args.output, level=args.level, threads=args.threads)
    if args.json:
        print(json.dumps(dataclasses.asdict(st)))
        return 0
    rows = [
        ("bytes in the image", _mb(st.bytes_image)),
        ("  zero", _mb(st.bytes_zero)),
        ("  found in the base(s)", _mb(st.bytes_copied)),
        ("  changed (to send)", _mb(st.bytes_changed)),
        ("bytes written", f"{_mb(st.bytes_written)} -> {args.output}"),
        ("time", f"{st.seconds:.2f} s"),
    ]
    for k, v in rows:
        print(f"{k:<24} {v}")
    return 0


def run_patch(args: argparse.Namespace) -> int:
    from dwcp.delta import apply_delta

    st = apply_delta(args.delta, args.base, args.output)
    if args.json:
        print(json.dumps({**dataclasses.asdict(st), "output": args.output, "verified": True}))
        return 0
    print(f"{args.output}: {_mb(st.bytes_image)} rebuilt and verified in {st.seconds:.2f} s")
    print(f"sha256 {st.sha256}")
    return 0
