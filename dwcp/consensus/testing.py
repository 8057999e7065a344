"""A loopback cluster of replica processes, for tests, benchmarks and demos.

Kept out of the daemon's import path (``dwcp.consensus.net`` is what a node loads).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from dwcp.consensus.net import NetConfig, init_cluster
from dwcp.identity import NodeKey


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel just handed out (closed again; good enough for loopback tests)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """Starts n replica processes on loopback from a fresh directory (tests, benchmarks, demos)."""

    def __init__(self, directory: str | os.PathLike[str], *, clients: int = 1, **tuning: Any):
        self.dir = Path(directory)
        ports = free_ports(4 if "n" not in tuning else int(tuning["n"]))
        self.net = init_cluster(self.dir, clients=clients, base_port=0, **tuning)
        self.net = NetConfig(self.net.cluster, tuple(("127.0.0.1", p) for p in ports))
        self.net.dump(self.dir / "cluster.json")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.replica_args: list[str] = []
        """Extra command-line flags for every replica (e.g. ``--sync-thread``)."""

    def client_keys(self) -> list[NodeKey]:
        return [
            NodeKey.load(self.dir / f"client-{j}.key") for j in range(len(self.net.cluster.clients))
        ]

    def start(self, i: int, *, recovering: bool = False) -> None:
        wal = self.dir / f"replica-{i}.wal"
        cmd = [
            sys.executable,
            "-m",
            "dwcp.consensus.net",
            "replica",
            "--config",
            str(self.dir / "cluster.json"),
            "--id",
            str(i),
            "--key",
            str(self.dir / f"replica-{i}.key"),
            "--wal",
            str(wal),
        ]
        cmd.extend(self.replica_args)
        if recovering:
            cmd.append("--recovering")
        elif not wal.exists():
            cmd.append("--new")
        log = open(self.dir / f"replica-{i}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def start_all(self) -> None:
        for i in range(self.net.cluster.n):
            self.start(i)

    def kill(self, i: int) -> None:
        """SIGKILL replica ``i`` (a crash: no clean shutdown)."""
        p = self.procs.pop(i)
        p.kill()
        p.wait()

    def log(self, i: int) -> str:
        return (self.dir / f"replica-{i}.log").read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
