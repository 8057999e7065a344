"""A loopback cluster of replica processes, for tests, benchmarks and demos.

Kept out of the daemon's import path (``dwcp.consensus.net`` is what a node loads).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from dwcp.consensus.net import NetConfig, init_cluster
from dwcp.identity import NodeKey

_HANDED_OUT: set[int] = set()
# Below the kernel's ephemeral range (32768-60999 by default), so a port handed out here is
# not also given to some process's outgoing connection between the check and the bind.
_PORT_RANGE = (10000, 32767)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free for both TCP and UDP on ``host`` (checked, then closed again: good enough
    for loopback tests), never the same twice in one process. Drawn at random outside the
    ephemeral range, because the kernel's own ``bind(0)`` picks from the range that outgoing
    connections use too, which made concurrent test runs collide ("Address already in use")."""
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(64 * count):
        if len(ports) == count:
            return ports
        port = rng.randint(*_PORT_RANGE)
        if port in _HANDED_OUT or not _bindable(host, port):
            continue
        _HANDED_OUT.add(port)
        ports.append(port)
    raise OSError(f"no {count} free ports on {host} in {_PORT_RANGE}")


def _bindable(host: str, port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


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
