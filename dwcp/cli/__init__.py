"""The ``dwcp`` command line.

Subcommands are thin: each converts its flags and calls the Python API, so the
logic is testable without a shell. Every module ``dwcp.cli.*_cmd`` exposes
``register(subparsers)`` and is found by name, so a new command is one new
file; ``ORDER`` only sets the order of the help listing. Errors from
``dwcp.errors`` become one line on stderr and a named exit code.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from dwcp.errors import DwcpError, LocalError
from dwcp.version import PROTOCOL_VERSION, __version__

EXIT_OK = 0
EXIT_FAILURE = 1  # the operation failed (bad data, peer, integrity...)
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_INTERRUPTED = 130

# The help listing's order; any other ``*_cmd`` module follows, sorted by name.
ORDER: tuple[str, ...] = (
    "keygen_cmd",
    "delta_cmd",
    "init_cmd",
    "peers_cmd",
    "migrate_cmd",
    "images_cmd",
    "status_cmd",
    "perf_cmd",
    "cluster_cmd",
    "owner_cmd",
    "vm_cmd",
)


def command_modules() -> tuple[str, ...]:
    """Every command module under ``dwcp.cli``, in help order."""
    here = pkgutil.iter_modules(__path__)
    found = sorted(m.name for m in here if m.name.endswith("_cmd"))
    return tuple(n for n in ORDER if n in found) + tuple(n for n in found if n not in ORDER)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwcp",
        description="DWCP v3: move VM images across a WAN (delta encoding, QUIC, BFT commit).",
    )
    parser.add_argument("--config", metavar="FILE", help="node configuration (node.toml)")
    parser.add_argument(
        "--version",
        action="version",
        version=f"dwcp {__version__} (DWCP protocol {PROTOCOL_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in command_modules():
        module = importlib.import_module(f"dwcp.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dwcp``; returns the process exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if "--" in argv and getattr(args, "passthrough", None) is not None:
        # A command that passes arguments on (``dwcp vm start NAME -- QEMU_ARGS``) takes
        # all after ``--`` verbatim; argparse cannot do that behind a subcommand's positionals.
        args.passthrough = argv[argv.index("--") + 1 :]
    elif "--" in argv:
        args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print("dwcp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LocalError as exc:
        print(f"dwcp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILURE
    except DwcpError as exc:
        print(f"dwcp: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"dwcp: error: no space left on device: {exc.filename or ''}", file=sys.stderr)
        else:
            print(f"dwcp: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
