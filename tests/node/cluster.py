"""Real ``dwcp-node`` daemons as subprocesses on loopback, driven through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dwcp.consensus.testing import free_ports
from dwcp.node import control
from dwcp.node.config import load_config

PY = sys.executable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
STARTUP_POLLS = 400  # x 0.05 s: generous for a loaded 2-core machine


def free_udp_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free for TCP and UDP alike (``kind`` is kept for the callers' clarity)."""
    del kind
    return free_ports(1)[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dwcp(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [PY, "-m", "dwcp.cli", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(f"dwcp {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


class NodeProc:
    """One node directory and, while running, its daemon process."""

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        drain_seconds: float | None = None,
        idle_timeout: float | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.dir = root / name
        self.name = name
        self.port = free_udp_port()
        out = dwcp("init", str(self.dir), "--listen", f"127.0.0.1:{self.port}", "--name", name)
        self.pubkey = out.stdout.strip().splitlines()[-1]
        self.config = self.dir / "node.toml"
        if drain_seconds is not None:
            text = self.config.read_text().replace(
                "drain_seconds = 10", f"drain_seconds = {drain_seconds}"
            )
            self.config.write_text(text)
        if idle_timeout is not None:
            text = self.config.read_text().replace(
                "idle_timeout = 30", f"idle_timeout = {idle_timeout}"
            )
            self.config.write_text(text)
        if metrics_port is not None:
            text = self.config.read_text().replace(
                '# metrics_listen = "127.0.0.1:9400"',
                f'metrics_listen = "127.0.0.1:{metrics_port}"',
            )
            self.config.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "stderr.log"

    @property
    def images(self) -> Path:
        return self.dir / "data" / "images"

    @property
    def partial(self) -> Path:
        return self.dir / "data" / "partial"

    def trust(self, other: NodeProc) -> None:
        self.cli("peers", "add", other.name, f"127.0.0.1:{other.port}", other.pubkey)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return dwcp("--config", str(self.config), *args, check=check, timeout=timeout)

    def migrate_json(self, *args: str) -> dict[str, Any]:
        r = self.cli("migrate", *args, "--json")
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))

    def popen_cli(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [PY, "-m", "dwcp.cli", "--config", str(self.config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )

    def command(self, argv: list[str]) -> list[str]:
        """How the daemon is launched: as is here; a subclass may wrap it (a namespace)."""
        return argv

    def start(self) -> None:
        assert self.proc is None
        argv = [PY, "-m", "dwcp.node", "--config", str(self.config), "--log-level", "debug"]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                self.command(argv), stdout=subprocess.DEVNULL, stderr=err, env=ENV
            )
        sock = load_config(self.config).control_path
        for _ in range(STARTUP_POLLS):
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited: {self.log.read_text()}")
            try:
                control.call(sock, "status", timeout=10)
                return
            except (control.NodeNotRunningError, OSError):
                time.sleep(0.05)
        raise AssertionError(f"node {self.name} did not start")

    def status(self) -> dict[str, Any]:
        return dict(control.call(load_config(self.config).control_path, "status", timeout=10))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        proc, self.proc = self.proc, None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the node dumps its stacks to its log
            time.sleep(2)
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"node {self.name} did not stop; its log ends with:\n{self.log.read_text()[-8000:]}"
            ) from None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def wait_until(predicate: Any, what: str, polls: int = 1200, interval: float = 0.05) -> None:
    """Poll ``predicate`` (bounded count); fail naming ``what`` if it never holds."""
    for _ in range(polls):
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def make_image(path: Path, mib: int, seed: int) -> None:
    """Pseudo-random data with zero runs, like a sparse disk (deterministic per seed)."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(mib * 256):
            if i % 7 == 0:
                f.write(bytes(4096))
            else:
                f.write(rnd.randbytes(4096))


def mutate(src: Path, dst: Path, blocks: list[int], seed: int) -> None:
    import random

    rnd = random.Random(seed)
    data = bytearray(src.read_bytes())
    for b in blocks:
        data[b * 4096 : b * 4096 + 4096] = rnd.randbytes(4096)
    dst.write_bytes(data)


def init_cluster(
    root: Path, nodes: list[NodeProc], extra_replicas: list[str], clients: list[str], timeout: int
) -> Path:
    """One PBFT cluster: `nodes` are replicas 0.. in order, then `extra_replicas` (public keys).

    Each node's config names its replica id and the node joins, so the daemons' tests all start
    from the same set-up instead of each spelling `cluster init` and the config lines.
    """
    keys = [n.pubkey for n in nodes] + extra_replicas
    cluster = root / "cluster.json"
    dwcp(
        "cluster",
        "init",
        str(cluster),
        *(f"--replica={k}@127.0.0.1:{p}" for k, p in zip(keys, free_ports(len(keys)), strict=True)),
        *(f"--client={c}" for c in clients),
    )
    for i, node in enumerate(nodes):
        with open(node.config, "a", encoding="utf-8") as f:
            f.write(f'\n[consensus]\ncluster = "{cluster}"\nreplica = {i}\ntimeout = {timeout}\n')
        node.cli("cluster", "join")  # first start: an empty log
    return cluster
