"""``dwcp delta`` and ``dwcp patch``: delta files for disk images (HDE).

Like ``zstd --patch-from`` or rsync batch files, but matching 4 KiB blocks of
disk images first. Output contract (stable): with ``--json`` one JSON object on
the last line with the figures printed in the table. Outputs follow
``dwcp.cli.outputs``: ``-o -`` writes the delta to standard output (the table then
goes to stderr), ``dwcp patch -`` reads it from standard input, an existing output
needs ``--force`` or ``--backup``, and a symlink, device or FIFO is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import IO, Any

from dwcp.cli.outputs import add_replace_flags, check_output
from dwcp.errors import UsageError


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
    d.add_argument("-o", "--output", required=True, metavar="FILE", help="'-' for stdout")
    d.add_argument("--level", type=int, default=1, help="zstd level (default 1; 3+ for slow links)")
    d.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="compression threads (default: up to 2)",
    )
    d.add_argument(
        "--dry-run",
        action="store_true",
        help="encode but write nothing; print the figures a real run would",
    )
    add_replace_flags(d)
    d.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    d.set_defaults(func=run_delta)

    p: argparse.ArgumentParser = sub.add_parser(
        "patch", help="rebuild an image from a delta file and its base image(s)"
    )
    p.add_argument("delta", metavar="FILE", help="'-' for stdin")
    p.add_argument("--base", action="append", default=[], metavar="OLD")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    add_replace_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run_patch)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


class _Sink:
    """A stream that counts and drops what is written (``--dry-run``)."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        """Nothing buffered."""


def run_delta(args: argparse.Namespace) -> int:
    from dwcp.delta import make_delta  # lazy: the other commands start faster

    target: Any
    if args.dry_run:
        target = _Sink()
    else:
        path = check_output(args.output, force=args.force, backup=args.backup)
        if path is None and sys.stdout.isatty():
            raise UsageError("-o -: standard output is a terminal; redirect it to a file or pipe")
        target = sys.stdout.buffer if path is None else path
    st = make_delta(args.new, args.base, target, level=args.level, threads=args.threads)
    # With the delta on stdout the figures go to stderr, keeping the stream clean.
    out: IO[str] = sys.stderr if args.output == "-" and not args.dry_run else sys.stdout
    if args.json:
        print(json.dumps({**dataclasses.asdict(st), "dry_run": args.dry_run}), file=out)
        return 0
    rows = [
        ("bytes in the image", _mb(st.bytes_image)),
        ("  zero", _mb(st.bytes_zero)),
        ("  found in the base(s)", _mb(st.bytes_copied)),
        ("  changed (to send)", _mb(st.bytes_changed)),
        (
            "bytes written",
            f"{_mb(st.bytes_written)} -> " + ("nothing (dry run)" if args.dry_run else args.output),
        ),
        ("time", f"{st.seconds:.2f} s"),
    ]
    for k, v in rows:
        print(f"{k:<24} {v}", file=out)
    return 0


def run_patch(args: argparse.Namespace) -> int:
    from dwcp.delta import apply_delta

    if args.output == "-":
        raise UsageError(
            "patch -o -: the image is rebuilt and verified before it appears, which needs a "
            "file; write it to a file (and then read that)"
        )
    check_output(args.output, force=args.force, backup=args.backup)
    source: Any = sys.stdin.buffer if args.delta == "-" else args.delta
    st = apply_delta(source, args.base, args.output)
    if args.json:
        print(json.dumps({**dataclasses.asdict(st), "output": args.output, "verified": True}))
        return 0
    print(f"{args.output}: {_mb(st.bytes_image)} rebuilt and verified in {st.seconds:.2f} s")
    print(f"sha256 {st.sha256}")
    return 0
