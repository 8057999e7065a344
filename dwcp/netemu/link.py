"""``Link``: two network namespaces joined by an emulated WAN link.

Side a and side b each get a namespace holding one end of the link (address
``addr_a`` / ``addr_b`` in the RFC 2544 benchmarking range 198.18.0.0/15).
Where the kernel has ``netem`` the ends are a veth pair shaped by netem;
otherwise (this project's CI) they are TUN devices joined by the C forwarding
loop in a child process. Everything is torn down on exit, on an exception and
on SIGTERM; namespaces of runs that were SIGKILLed are removed by the next run.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import signal
import subprocess
import threading
import weakref
from types import FrameType, TracebackType
from typing import Any

from dwcp.errors import EmulatorError, UsageError
from dwcp.netemu import netns
from dwcp.netemu.forwarder import Forwarder
from dwcp.netemu.params import MTU, Direction
from dwcp.netemu.stats import DirectionStats, LinkStats

ADDR_A = "198.18.0.1"
ADDR_B = "198.18.0.2"
TXQUEUELEN = 10000

_counter = itertools.count()
_open: weakref.WeakSet[Link] = weakref.WeakSet()


class Link:
    """An emulated link between namespaces a and b; use as a context manager.

    ``rate_bps``, ``delay_ms`` (one way), ``loss`` and the queue apply to each
    direction; pass ``a_to_b`` / ``b_to_a`` for asymmetric links. ``seed``
    makes the loss pattern reproducible (TUN backend; netem's is random).
    ``backend`` is "auto" (netem when the kernel has it), "tun" or "netem".
    ``realtime`` runs the TUN forwarder at SCHED_FIFO priority 2 (else nice -10).
    """

    def __init__(
        self,
        rate_bps: float = 100e6,
        delay_ms: float = 25.0,
        loss: float = 0.0,
        seed: int = 1,
        queue_bytes: int | None = None,
        queue_ms: float | None = None,
        *,
        a_to_b: Direction | None = None,
        b_to_a: Direction | None = None,
        backend: str = "auto",
        realtime: bool = True,
    ) -> None:
        both = Direction(rate_bps, delay_ms, loss, queue_bytes, queue_ms)
        self.a_to_b = a_to_b or both
        self.b_to_a = b_to_a or both
        self.seed = seed
        if backend not in ("auto", "tun", "netem"):
            raise UsageError(f"backend={backend!r}: use 'auto', 'tun' or 'netem'")
        self._backend_wanted = backend
        self._realtime = realtime
        self.backend = ""
        n = next(_counter)
        self.ns_a = f"{netns.PREFIX}-{os.getpid()}-{n}-a"
        self.ns_b = f"{netns.PREFIX}-{os.getpid()}-{n}-b"
        self._if_a = f"dwe{os.getpid()}x{n}a"[-15:]
        self._if_b = f"dwe{os.getpid()}x{n}b"[-15:]
        self.addr_a = ADDR_A
        self.addr_b = ADDR_B
        self._fds: list[int] = []
        self._forwarder: Forwarder | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._old_sigterm: Any = None
        self._open = False

    # --- lifecycle -------------------------------------------------------

    def __enter__(self) -> Link:
        self.open()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        """Build the namespaces and the link (raises EmulatorError when it cannot)."""
        reason = netns.unavailable_reason()
        if reason:
            raise EmulatorError(reason)
        netns.cleanup_stale()
        self._catch_sigterm()
        _open.add(self)
        self._open = True
        try:
            for ns in (self.ns_a, self.ns_b):
                netns.ip("netns", "add", ns)
                netns.ip("link", "set", "lo", "up", ns=ns)
                # No IPv6: its autoconfiguration chatter would cross the link uninvited.
                sysctl = ["sysctl", "-q", "-w"]
                sysctl += [
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ]
                netns.run(netns.ns_exec(ns, sysctl))
            use_netem = self._backend_wanted == "netem" or (
                self._backend_wanted == "auto" and netns.has_netem()
            )
            if use_netem:
                self._open_netem()
            else:
                self._open_tun()
        except BaseException:
            self.close()
            raise

    def _open_tun(self) -> None:
        self.backend = "tun"
        fd_a = netns.open_tun(self._if_a)
        self._fds.append(fd_a)
        fd_b = netns.open_tun(self._if_b)
        self._fds.append(fd_b)
        for ifname, ns, local, peer in (
            (self._if_a, self.ns_a, self.addr_a, self.addr_b),
            (self._if_b, self.ns_b, self.addr_b, self.addr_a),
        ):
            netns.ip("link", "set", "dev", ifname, "netns", ns)
            netns.ip(
                "link", "set", "dev", ifname, "mtu", str(MTU), "txqueuelen", str(TXQUEUELEN), ns=ns
            )
            netns.ip("addr", "add", local, "peer", f"{peer}/32", "dev", ifname, ns=ns)
            netns.ip("link", "set", "dev", ifname, "up", ns=ns)
        self._forwarder = Forwarder(fd_a, fd_b, self.a_to_b, self.b_to_a, self.seed, self._realtime)

    def _open_netem(self) -> None:
        self.backend = "netem"
        netns.ip("link", "add", self._if_a, "type", "veth", "peer", "name", self._if_b)
        for ifname, ns, local, d in (
            (self._if_a, self.ns_a, self.addr_a, self.a_to_b),
            (self._if_b, self.ns_b, self.addr_b, self.b_to_a),
        ):
            netns.ip("link", "set", "dev", ifname, "netns", ns)
            netns.ip(
                "link", "set", "dev", ifname, "mtu", str(MTU), "txqueuelen", str(TXQUEUELEN), ns=ns
            )
            netns.ip("addr", "add", f"{local}/30", "dev", ifname, ns=ns)
            netns.ip("link", "set", "dev", ifname, "up", ns=ns)
            limit = max(d.queue_limit // MTU, 1) + int(d.rate_bps * d.delay_ms / 8000 / MTU) + 64
            argv = ["tc", "-n", ns, "qdisc", "add", "dev", ifname, "root", "netem"]
            argv += ["delay", f"{d.delay_ms}ms", "limit", str(limit)]
            if d.rate_bps:
                argv += ["rate", f"{int(d.rate_bps)}bit"]
            if d.loss:
                argv += ["loss", f"{d.loss * 100}%"]
            netns.run(argv)

    def close(self) -> None:
        """Tear everything down (idempotent): processes, forwarder, devices, namespaces."""
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
        if self._forwarder is not None:
            self._final = LinkStats.from_c(self._forwarder.report)
            self._forwarder.close()
            self._forwarder = None
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for ns in (self.ns_a, self.ns_b):
            netns.delete_ns(ns)
        _open.discard(self)
        self._restore_sigterm()

    def _catch_sigterm(self) -> None:
        """Turn SIGTERM into SystemExit so ``with Link()`` blocks unwind and clean up."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._old_sigterm = signal.SIG_DFL
            signal.signal(signal.SIGTERM, _raise_exit)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            others = [link for link in _open if link._open]
            if others:  # they still rely on the handler: the last one restores it
                others[0]._old_sigterm = self._old_sigterm
            else:
                signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # --- running things on either side ------------------------------------

    def cmd(self, side: str, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` in namespace ``side`` ("a" or "b")."""
        return netns.ns_exec(self._ns(side), argv)

    def _ns(self, side: str) -> str:
        if side not in ("a", "b"):
            raise UsageError(f"side={side!r}: use 'a' or 'b'")
        if not self._open:
            raise UsageError("the link is closed; use it inside `with Link(...) as link:`")
        return self.ns_a if side == "a" else self.ns_b

    def run_in(self, side: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside one side's namespace (``timeout`` defaults to 60 s)."""
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(side, argv), check=kw.pop("check", False), **kw)

    def popen(self, side: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside one side's namespace; killed when the link closes."""
        p = subprocess.Popen(self.cmd(side, argv), **kw)
        self._procs.append(p)
        return p

    def enter(self, side: str) -> contextlib.AbstractContextManager[None]:
        """Run the block (this thread only) inside one side's namespace; see ``netns.entered``."""
        return netns.entered(self._ns(side))

    def run_in_a(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        return self.run_in("a", argv, **kw)

    def run_in_b(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        return self.run_in("b", argv, **kw)

    def popen_a(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        return self.popen("a", argv, **kw)

    def popen_b(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        return self.popen("b", argv, **kw)

    # --- trace-driven rates ------------------------------------------------

    def set_rate(self, a_to_b_bps: float, b_to_a_bps: float | None = None) -> None:
        """Change the bottleneck rate while the link runs (b -> a only when given).

        TUN backend: the forwarder picks the rate up at the next packet. Open the link
        at the trace's peak rate: its delay line and queue are sized from the first rate.
        """
        if not self._open:
            raise UsageError("the link is closed; use it inside `with Link(...) as link:`")
        for r in (a_to_b_bps, b_to_a_bps or 1e3):
            if not 1e3 <= r <= 100e9:
                raise UsageError(f"rate {r} bit/s: give 1e3 up to 100e9 (0 = unlimited is fixed)")
        if self._forwarder is not None:
            self._forwarder.report.live_rate_ab_bps = int(a_to_b_bps)
            if b_to_a_bps is not None:
                self._forwarder.report.live_rate_ba_bps = int(b_to_a_bps)
            return
        todo = [(self.ns_a, self._if_a, a_to_b_bps)]
        if b_to_a_bps is not None:
            todo.append((self.ns_b, self._if_b, b_to_a_bps))
        for ns, ifname, r in todo:
            argv = ["tc", "-n", ns, "qdisc", "change", "dev", ifname, "root", "netem"]
            netns.run([*argv, "rate", f"{int(r)}bit"])

    # --- observation -----------------------------------------------------

    def stats(self) -> LinkStats:
        """Counters so far (the final ones after close, TUN backend)."""
        if self._forwarder is not None:
            return LinkStats.from_c(self._forwarder.report)
        if self.backend == "netem" and self._open:
            return LinkStats(
                self._netem_stats(self.ns_a, self._if_a),
                self._netem_stats(self.ns_b, self._if_b),
                0.0,
                0.0,
            )
        final: LinkStats | None = getattr(self, "_final", None)
        if final is None:
            raise UsageError("no statistics: the link was never opened")
        return final

    @staticmethod
    def _netem_stats(ns: str, ifname: str) -> DirectionStats:
        out = netns.run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", ifname])
        q = next(x for x in json.loads(out) if x.get("kind") == "netem")
        sent, drops = int(q.get("packets", 0)), int(q.get("drops", 0))
        size = int(q.get("bytes", 0))
        return DirectionStats(sent + drops, size, sent, size, drops, 0, 0, 0, 0, 0.0, 0)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@atexit.register
def _close_all() -> None:
    for link in list(_open):
        link.close()
