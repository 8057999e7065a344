"""Output paths the commands write, checked the same way in every command (issue 16).

Outputs appear by temp file and rename, and a rename over a symlink or a device
node replaces the link or the node itself (``-o /dev/stdout`` run as root once
replaced the ``/dev/stdout`` symlink with a 12 MB file). So an output that is a
symlink, a device, a FIFO, a socket or a directory is refused, ``-`` means the
standard stream where a stream makes sense, and an existing file is replaced only
with ``--force`` or kept first as ``NAME.~N~`` with ``--backup`` (cp's numbered
backups), as ``dwcp migrate`` does at the destination.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

from dwcp.errors import UsageError

STREAM = "-"

_KINDS = (
    (stat.S_ISLNK, "a symlink"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def add_replace_flags(parser: argparse.ArgumentParser) -> None:
    """``--force`` / ``--backup``, spelled and explained alike in every command."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="replace an existing output file")
    g.add_argument(
        "--backup", action="store_true", help="keep an existing output file as NAME.~N~ first"
    )


def backup_name(path: Path) -> Path:
    """The first free ``NAME.~N~`` beside ``path`` (cp --backup=numbered's naming)."""
    n = 1
    while True:
        cand = path.with_name(f"{path.name}.~{n}~")
        if not os.path.lexists(cand):
            return cand
        n += 1


def check_output(
    path: str | os.PathLike[str], *, force: bool = False, backup: bool = False
) -> Path | None:
    """Check an output path before anything is written; ``None`` means standard output.

    Raises UsageError (exit 2) naming the path and what to do. With ``backup`` an
    existing file is hard-linked to ``NAME.~N~`` here, so the later rename keeps it.
    """
    if os.fspath(path) == STREAM:
        return None
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        if not p.parent.is_dir():
            raise UsageError(f"{p}: directory {p.parent} does not exist") from None
        return p
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise UsageError(
                f"{p} is {kind}: dwcp writes outputs by temp file and rename, which would "
                "replace it; write to a regular file path instead"
                + (" (or '-' for standard output)" if kind != "a directory" else "")
            )
    if backup:
        kept = backup_name(p)
        os.link(p, kept)
        return p
    if not force:
        raise UsageError(
            f"{p} exists; nothing was changed: re-run with --force to replace it, "
            "or --backup to keep it as NAME.~N~"
        )
    return p
