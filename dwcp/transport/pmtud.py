"""Datagram packetization-layer path MTU discovery (DPLPMTUD, RFC 8899; RFC 9000 14.3), sans-IO.

Why: every datagram costs aioquic ~60 us of Python whatever its size, so on a
path that carries larger datagrams than the 1452 bytes every path carries
(loopback: 65536-byte MTU, datacenter jumbo frames: 9000) the CPU per byte
falls with the datagram size. The size is only raised once the peer has
acknowledged a probe of it, so a path that drops big datagrams never sees data
in them.

The search: probes are ack-eliciting packets of PING + PADDING (no data, so a
lost probe costs no retransmission, and the connection reports it to the
congestion controller as expired, not lost: a probe too big for the path is
not congestion). Candidates, largest first: the cap (the peer's
max_udp_payload_size, the largest local interface MTU less IPv6 + UDP headers,
``MAX_DATAGRAM``), then jumbo-frame size. A candidate lost ``PROBE_TRIES``
times is dropped and the next smaller is tried; the first acknowledged one
becomes the datagram size and ends the search until ``RAISE_INTERVAL`` later.
Black hole (RFC 8899 4.4): persistent congestion while above the base size
sends the connection back to the base and searches again later.
Sockets set DF without fragmentation (``IP_PMTUDISC_PROBE``, ``aio``), so a
probe over a narrower link is dropped (or refused locally with EMSGSIZE), never
fragmented.
"""

from __future__ import annotations

import functools
from pathlib import Path

IP_UDP_OVERHEAD = 48  # IPv6 (40) + UDP (8): the conservative one for a dual-stack socket
MAX_DATAGRAM = 65527  # RFC 9000's default max_udp_payload_size
JUMBO_MTU = 9000
PROBE_TRIES = 2
RAISE_INTERVAL = 600.0  # s before a search that found a size looks for a larger one
BLACK_HOLE_WAIT = 60.0  # s at the base size after a black hole, before searching again


@functools.cache
def interface_mtu() -> int:
    """The largest MTU of this host's network interfaces (1500 if it cannot tell).

    A cap only: the probes find what the path carries."""
    best = 0
    try:
        for mtu in Path("/sys/class/net").glob("*/mtu"):
            try:
                best = max(best, int(mtu.read_text().strip()))
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or 1500


class PmtuSearch:
    """The search for one connection's path: which probe to send, what the size is."""

    def __init__(self, base: int, cap: int) -> None:
        self.base = base
        self.size = base
        """Datagram size the connection may use (raised only by an acknowledged probe)."""
        cap = min(cap, MAX_DATAGRAM)
        sizes = {cap, JUMBO_MTU - IP_UDP_OVERHEAD}
        self._all = sorted((s for s in sizes if base < s <= cap), reverse=True)
        self._candidates = list(self._all)
        self._tries = 0
        self.in_flight: int | None = None
        """Size of the probe awaiting its fate (at most one at a time)."""
        self._next_at = 0.0
        self.probes_lost = 0

    def probe_due(self, now: float) -> int | None:
        """The size to probe now, or None (a probe is out, the search ended or waits)."""
        if self.in_flight is not None or not self._candidates or now < self._next_at:
            return None
        return self._candidates[0]

    def sent(self, size: int) -> None:
        self.in_flight = size

    def acked(self, size: int, now: float) -> None:
        """The probe of ``size`` got through: use it; larger candidates wait a raise interval."""
        self.in_flight = None
        self.size = max(self.size, size)
        self._tries = 0
        self._candidates = [c for c in self._candidates if c > self.size]
        self._next_at = now + RAISE_INTERVAL

    def lost(self, size: int, now: float = 0.0) -> None:
        """The probe of ``size`` was lost: after ``PROBE_TRIES`` losses try the next smaller;
        when every candidate is spent, search again ``BLACK_HOLE_WAIT`` later (a starved
        host can lose every probe to a full socket buffer, not to the path)."""
        self.in_flight = None
        self.probes_lost += 1
        self._tries += 1
        if self._tries >= PROBE_TRIES and self._candidates and self._candidates[0] == size:
            self._candidates.pop(0)
            self._tries = 0
            if not self._candidates and self.size == self.base:
                self._candidates = list(self._all)
                self._next_at = now + BLACK_HOLE_WAIT

    def black_hole(self, now: float) -> None:
        """Datagrams of ``size`` stopped getting through (the connection saw persistent
        congestion): back to the base size, and search again ``BLACK_HOLE_WAIT`` later."""
        self.size = self.base
        self.in_flight = None
        self._tries = 0
        self._candidates = list(self._all)
        self._next_at = now + BLACK_HOLE_WAIT
