"""Two VM nodes, a 4-replica ownership cluster and a cuttable link, for the live fault tests.

The replicas run as their own processes (``python -m dwcp.consensus.net replica``), so
killing a node never costs the registry its quorum: the registry stands for the
cluster's other members, which outlive a node crash. Node a reaches node b through
``UdpLink``, a loopback datagram forwarder the test can cut (drop everything, both
ways) and heal: a link cut between the two hosts, the registry still reachable.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from node.cluster import ENV, PY, NodeProc, dwcp, wait_until

from dwcp.consensus.testing import free_ports
from dwcp.identity import NodeKey, PublicKey
from dwcp.live import hold
from dwcp.vm import guest
from vm.test_supervisor import ticks

IDLE_TIMEOUT = 4  # seconds of silence before a session counts as lost (the link cut)


class UdpLink(threading.Thread):
    """Forward datagrams from ``listen`` to ``target`` and the answers back; ``cut`` drops all;
    ``rate`` (bytes/s, a token bucket) drops what exceeds it towards ``target``: a slow link."""

    def __init__(self, target: int, rate: float | None = None) -> None:
        super().__init__(daemon=True)
        self.target = ("127.0.0.1", target)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.cut = False
        self.rate = rate
        self.tokens, self.stamp = 0.0, time.monotonic()
        self.closed = False
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.upstream: dict[Any, socket.socket] = {}  # client address -> its socket to target

    def run(self) -> None:
        while not self.closed:
            for key, _ in self.sel.select(0.2):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(OSError):
                    data, addr = s.recvfrom(65536)
                    if self.cut or not self._admit(len(data), key.data is None):
                        continue
                    if key.data is None:  # from a client
                        up = self.upstream.get(addr)
                        if up is None:
                            up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                            up.bind(("127.0.0.1", 0))
                            self.upstream[addr] = up
                            self.sel.register(up, selectors.EVENT_READ, addr)
                        up.sendto(data, self.target)
                    else:  # from the target, back to that client
                        self.sock.sendto(data, key.data)

    def _admit(self, size: int, forward: bool) -> bool:
        if self.rate is None or not forward:
            return True
        now = time.monotonic()
        burst = self.rate / 20  # 50 ms of the rate
        self.tokens = min(burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < size:
            return False
        self.tokens -= size
        return True

    def close(self) -> None:
        self.closed = True
        self.join(timeout=5)
        for s in [self.sock, *self.upstream.values()]:
            s.close()


class FaultNode(NodeProc):
    """A ``NodeProc`` whose daemon may run with the live-migration hold hook."""

    def start(self) -> None:
        """Every start (restarts after a kill too) with the hold hook enabled."""
        old = dict(ENV)
        ENV[hold.ENV] = "1"
        try:
            super().start()
        finally:
            ENV.clear()
            ENV.update(old)

    def vm(self, name: str) -> Path:
        return self.dir / "data" / "vms" / name

    def vm_status(self, name: str) -> dict[str, Any]:
        """``vm status --json``; ``{}`` when the VM was never defined here."""
        r = self.cli("vm", "status", name, "--json", timeout=120, check=False)
        if r.returncode != 0:
            assert "vm.json" in r.stderr or "not defined" in r.stderr or "no VM" in r.stderr, (
                r.stderr
            )
            return {}
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))

    def node_id(self) -> str:
        return PublicKey.parse(self.pubkey).node_id


class FaultWorld:
    def __init__(self, root: Path, rate: float | None = None) -> None:
        self.root = root
        self.a, self.b = (
            FaultNode(root, "a", idle_timeout=IDLE_TIMEOUT),
            FaultNode(root, "b", idle_timeout=IDLE_TIMEOUT),
        )
        self.link = UdpLink(self.b.port, rate)
        self.link.start()
        self.a.cli("peers", "add", "b", f"127.0.0.1:{self.link.port}", self.b.pubkey)
        self.b.trust(self.a)
        keys = [NodeKey.generate() for _ in range(4)]
        for i, k in enumerate(keys):
            k.save(root / f"replica-{i}.key")
        ports = free_ports(4)
        self.cluster = root / "cluster.json"
        dwcp(
            "cluster", "init", str(self.cluster),
            *(f"--replica={k.public.text}@127.0.0.1:{p}" for k, p in zip(keys, ports, strict=True)),
            f"--client={self.a.pubkey}", f"--client={self.b.pubkey}",
        )  # fmt: skip
        for node in (self.a, self.b):
            with open(node.config, "a", encoding="utf-8") as f:
                f.write(f'\n[consensus]\ncluster = "{self.cluster}"\ntimeout = 60\n')
        self.replicas: list[subprocess.Popen[bytes]] = []
        for i in range(4):
            cmd = [PY, "-m", "dwcp.consensus.net", "replica", "--config", str(self.cluster)]
            cmd += ["--id", str(i), "--key", str(root / f"replica-{i}.key")]
            cmd += ["--wal", str(root / f"replica-{i}.wal"), "--new"]
            with open(root / f"replica-{i}.log", "ab") as log:
                self.replicas.append(
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
                )
        for n in (self.a, self.b):
            n.start()

    def close(self) -> None:
        for n in (self.a, self.b):
            if n.proc is not None:
                with contextlib.suppress(AssertionError):
                    n.stop()
        for p in self.replicas:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        self.link.close()

    def running_on(self, name: str) -> list[FaultNode]:
        """The nodes where the VM's QEMU runs (``vm status``; a node that is down: by pid)."""
        return [n for n in (self.a, self.b) if n.vm_status(name).get("state") == "running"]


def kill_qemu(node: FaultNode, name: str) -> None:
    """Test cleanup: QEMU outlives its node by design, so kill the one the test started."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((node.vm(name) / "qemu.pid").read_text()), signal.SIGKILL)


def wait_ticks_after(node: FaultNode, name: str, last: int, what: str) -> None:
    wait_until(lambda: any(t > last for t, _ in ticks(node, name)), what, polls=2400)


def disk_ticks(node: FaultNode, disk: str) -> dict[int, str]:
    return guest.disk_ticks((node.images / disk).read_bytes())
