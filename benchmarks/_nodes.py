"""Real ``dwcp-node`` daemons for the benchmarks that run them inside the link
emulator's namespaces (``live_bench``, ``itp_star``): init, peers, start, wait for the
control socket. Usage::

    from _nodes import BenchNode, cli
    a = BenchNode(root, "a", f"{link.addr_a}:{port}")
    a.cli("peers", "add", ...); a.start(link, "a")   # link: a Link or a Star
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from dwcp.node import control
from dwcp.node.config import load_config

PY = sys.executable


class Spawner(Protocol):
    """``dwcp.netemu.Link`` or ``Star``: runs a process in one side's namespace."""

    def popen(self, side: str, argv: list[str], **kw: Any) -> Any: ...


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``dwcp ARGS``; a failure raises with the end of its stderr."""
    r = subprocess.run(
        [PY, "-m", "dwcp.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    if r.returncode != 0:
        raise RuntimeError(f"dwcp {' '.join(args)}: {r.stderr.strip()[-500:]}")
    return r


class BenchNode:
    """One node's directory (``dwcp init``) and, once started, its daemon."""

    def __init__(self, root: Path, name: str, listen: str, timeout: float = 120) -> None:
        self.dir = root / name
        self.name = name
        self.timeout = timeout
        out = cli("init", str(self.dir), "--listen", listen, "--name", name)
        self.pubkey = out.stdout.strip().splitlines()[-1]
        self.config = self.dir / "node.toml"
        self.images = self.dir / "data" / "images"
        self.vms = self.dir / "data" / "vms"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return cli("--config", str(self.config), *args, timeout=timeout or self.timeout)

    def start(self, link: Spawner, side: str) -> None:
        """Start the daemon in ``side``'s namespace; return once its control socket answers."""
        with open(self.dir / "stderr.log", "ab") as err:
            argv = [PY, "-m", "dwcp.node", "--config", str(self.config)]
            self.proc = link.popen(side, argv, stderr=err)
        sock = load_config(self.config).control_path
        for _ in range(600):
            try:
                control.call(sock, "status", timeout=10)
                return
            except (control.NodeNotRunningError, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"node {self.name} did not start")
