"""``Star``: N source namespaces, each joined to one destination namespace by its own link.

The topology of a multi-source pull (issue 15): every source's path to the destination
has its own rate, delay and loss, and ``set_rate`` changes one of them mid-transfer (a
drop, a trace). Link i joins namespace ``src{i}`` (address ``198.18.{i+1}.1``) to the
destination's ``198.18.{i+1}.2``; the destination holds one end of every link. TUN
backend only (the forwarding loop of ``dwcp.netemu.link``, one process per link), so it
runs where netem does not. Everything is torn down on exit and on an exception.

    with Star([Direction(10e6, 25, 0.005), Direction(20e6, 25, 0.005)]) as star:
        star.popen("src0", [...]); star.popen("dst", [...])
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from dwcp.errors import EmulatorError, UsageError
from dwcp.netemu import netns
from dwcp.netemu.forwarder import Forwarder
from dwcp.netemu.link import TXQUEUELEN
from dwcp.netemu.params import MTU, Direction
from dwcp.netemu.stats import LinkStats

_counter = itertools.count()
DST = "dst"


def src_addr(i: int) -> str:
    return f"198.18.{i + 1}.1"


def dst_addr(i: int) -> str:
    return f"198.18.{i + 1}.2"


class Star:
    """Links ``links[i]`` (source i to destination; ``back[i]`` the other way, default the
    same) between N source namespaces and one destination namespace."""

    def __init__(
        self,
        links: Sequence[Direction],
        back: Sequence[Direction] | None = None,
        seed: int = 1,
        realtime: bool = False,
    ) -> None:
        if not links:
            raise UsageError("a star needs at least one source link")
        if back is not None and len(back) != len(links):
            raise UsageError("give one back direction per link")
        if len(links) > 250:
            raise UsageError("at most 250 source links")
        self.links = list(links)
        self.back = list(back) if back is not None else list(links)
        self.seed = seed
        self._realtime = realtime
        n = next(_counter)
        tag = f"{os.getpid()}-{n}"
        self._ns = {DST: f"{netns.PREFIX}-{tag}-d"}
        self._ns.update({f"src{i}": f"{netns.PREFIX}-{tag}-s{i}" for i in range(len(links))})
        self._fds: list[int] = []
        self._fwd: list[Forwarder] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._open = False

    @property
    def namespaces(self) -> list[str]:
        """The namespace names (for cleanup checks and ``ip netns exec``)."""
        return list(self._ns.values())

    @property
    def sources(self) -> list[str]:
        return [f"src{i}" for i in range(len(self.links))]

    def __enter__(self) -> Star:
        self.open()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        """Build the namespaces and links (``EmulatorError`` when it cannot)."""
        reason = netns.unavailable_reason()
        if reason:
            raise EmulatorError(reason)
        netns.cleanup_stale()
        self._open = True
        try:
            for ns in self._ns.values():
                netns.ip("netns", "add", ns)
                netns.ip("link", "set", "lo", "up", ns=ns)
                sysctl = ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]
                netns.run(netns.ns_exec(ns, sysctl))
            for i, (ab, ba) in enumerate(zip(self.links, self.back, strict=True)):
                self._link(i, ab, ba)
        except BaseException:
            self.close()
            raise

    def _link(self, i: int, ab: Direction, ba: Direction) -> None:
        pid = os.getpid() % 100000
        if_s, if_d = f"dws{pid}x{i}s"[-15:], f"dws{pid}x{i}d"[-15:]
        fd_s = netns.open_tun(if_s)
        self._fds.append(fd_s)
        fd_d = netns.open_tun(if_d)
        self._fds.append(fd_d)
        for ifname, ns, local, peer in (
            (if_s, self._ns[f"src{i}"], src_addr(i), dst_addr(i)),
            (if_d, self._ns[DST], dst_addr(i), src_addr(i)),
        ):
            netns.ip("link", "set", "dev", ifname, "netns", ns)
            netns.ip(
                "link", "set", "dev", ifname, "mtu", str(MTU), "txqueuelen", str(TXQUEUELEN), ns=ns
            )
            netns.ip("addr", "add", local, "peer", f"{peer}/32", "dev", ifname, ns=ns)
            netns.ip("link", "set", "dev", ifname, "up", ns=ns)
        self._fwd.append(Forwarder(fd_s, fd_d, ab, ba, self.seed + i, self._realtime))

    def close(self) -> None:
        """Tear everything down (idempotent)."""
        if not self._open:
            return
        self._open = False
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._final = [LinkStats.from_c(f.report) for f in self._fwd]
        for f in self._fwd:
            f.close()
        self._fwd.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for ns in self._ns.values():
            netns.delete_ns(ns)

    def route_sources(self) -> None:
        """Let the sources reach each other through the destination (it forwards).

        For a fleet on the star (gossip, issue 13): a datagram from source i to source j
        crosses link i, then link j, so it meets both links' delay and loss.
        """
        dst = self._name(DST)
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"):
            netns.run(netns.ns_exec(dst, ["sysctl", "-q", "-w", key]))
        pid = os.getpid() % 100000
        for i in range(len(self.links)):
            if_s = f"dws{pid}x{i}s"[-15:]
            netns.ip("route", "add", "198.18.0.0/16", "dev", if_s, ns=self._name(f"src{i}"))

    def _name(self, side: str) -> str:
        if not self._open:
            raise UsageError("the star is closed; use it inside `with Star(...) as star:`")
        if side not in self._ns:
            raise UsageError(f"side={side!r}: use 'dst' or one of {self.sources}")
        return self._ns[side]

    def cmd(self, side: str, argv: list[str]) -> list[str]:
        return netns.ns_exec(self._name(side), argv)

    def run_in(self, side: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(side, argv), check=kw.pop("check", False), **kw)

    def popen(self, side: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """``Popen`` inside ``side``'s namespace; terminated when the star closes."""
        p = subprocess.Popen(self.cmd(side, argv), **kw)
        self._procs.append(p)
        return p

    def set_rate(self, i: int, to_dst_bps: float) -> None:
        """Change link i's source-to-destination rate now (open it at its peak rate)."""
        if not 1e3 <= to_dst_bps <= 100e9:
            raise UsageError(f"rate {to_dst_bps} bit/s: give 1e3 up to 100e9")
        self._fwd[i].report.live_rate_ab_bps = int(to_dst_bps)

    def stats(self) -> list[LinkStats]:
        """Per link counters (the final ones after close)."""
        if self._fwd:
            return [LinkStats.from_c(f.report) for f in self._fwd]
        return list(getattr(self, "_final", []))
