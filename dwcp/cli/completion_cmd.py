"""``dwcp completion bash|zsh|tcsh``: the shell completion script, on stdout.

Generated from the same argparse parser the command runs (shtab), so every command,
flag and choice completes and none can drift from ``--help``. Install for bash:
``dwcp completion bash > /etc/bash_completion.d/dwcp`` (or ``~/.local/share/
bash-completion/completions/dwcp``); zsh: into a directory on ``$fpath`` as ``_dwcp``.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

SHELLS = ("bash", "zsh", "tcsh")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "completion", help="print the shell completion script (bash, zsh or tcsh)"
    )
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shtab

    # Imported by name: dwcp.cli finds its command modules the same way, no import cycle.
    parser = importlib.import_module("dwcp.cli").build_parser()
    print(shtab.complete(parser, shell=args.shell), end="")
    return 0
