"""A seeded virtual-time simulator for the ASS membership core (``dwcp.gossip.swim``).

Why here and not in tests: ``benchmarks/gossip_bench.py`` and ``tests/gossip`` drive the
same network. One heap of events (message deliveries and member wake-ups), no asyncio,
no encoding (``Message.size`` is exact), so 5,000 members x 600 virtual seconds run on one
core. Faults: independent loss, uniform delay, partitions (a predicate on (src, dst)),
crashes and restarts (with or without the persisted incarnation), stalls (a member that
runs nothing for a while, then its expired timers fire before it reads its queued
messages, as after a long GC pause; with ``stall_drop`` the messages that arrive during
the stall are lost instead, as when a frozen process's socket buffer overflows), slow
receivers (``slow``: the member's timers keep running, so it keeps probing and accusing,
but what arrives is processed only at the end of the window, or lost with ``stall_drop``:
slow message processing, the anomaly of the Lifeguard paper) and forged messages
(dropped by authentication before the core sees them; counted).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

from dwcp.gossip.messages import Message
from dwcp.gossip.records import Change, SwimConfig
from dwcp.gossip.swim import Send, Swim

ENVELOPE_BYTES = 64 + 8 + 1 + 8  # signature, counter, sender name length + typical name
_WAKE, _DELIVER = 0, 1


class SimNet:
    """``n`` members named ``n0..n{n-1}`` on a simulated network; ``run_until(t)`` advances."""

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        config: SwimConfig | None = None,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0005, 0.005),
        stall_drop: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.config = config or SwimConfig()
        self.loss = loss
        self.delay = delay
        self.now = 0.0
        self.names = [f"n{i}" for i in range(n)]
        self.nodes: dict[str, Swim] = {}
        self.down: set[str] = set()
        self.stalled_until: dict[str, float] = {}
        self.slow_until: dict[str, float] = {}
        self.stall_drop = stall_drop
        self.stall_dropped = 0
        self.blocked: Callable[[str, str], bool] | None = None
        self.on_change: Callable[[str, Change], None] | None = None
        self.bytes_sent = 0
        self.messages = 0
        self.lost = 0
        self.forged_dropped = 0
        self._events: list[tuple[float, int, int, str, str, Message | None]] = []
        self._seq = 0
        self._wake_at: dict[str, float] = {}
        for name in self.names:
            self._start(name, 1)
        self.converge()

    def converge(self) -> None:
        """Start from a fleet that already knows everyone alive at incarnation 1 (a cold
        start announces every member to every other, which is not what the runs measure)."""
        for node in self.nodes.values():
            for m in node.members.values():
                m.inc = 1
            node.queue.clear()

    def _start(self, name: str, incarnation: int) -> None:
        node = Swim(
            name,
            self.names,
            now=self.now,
            config=self.config,
            incarnation=incarnation,
            rng=random.Random(self.rng.random()),
        )
        self.nodes[name] = node
        self._wake_at[name] = float("inf")
        self._schedule(node)

    def _schedule(self, node: Swim) -> None:
        t = node.next_deadline()
        if t < self._wake_at[node.name]:
            self._wake_at[node.name] = t
            self._seq += 1
            heapq.heappush(self._events, (t, self._seq, _WAKE, node.name, "", None))

    # --- faults ---------------------------------------------------------------------------

    def crash(self, name: str) -> None:
        self.down.add(name)

    def restart(self, name: str, *, persisted: bool = True) -> None:
        """Bring a crashed member back; with ``persisted`` its incarnation survived."""
        old = self.nodes[name].incarnation
        self.down.discard(name)
        self._start(name, old + 1 if persisted else 1)

    def stall(self, name: str, seconds: float) -> None:
        self.stalled_until[name] = max(self.stalled_until.get(name, 0.0), self.now + seconds)

    def slow(self, name: str, seconds: float) -> None:
        """For ``seconds`` ``name`` runs its timers but processes no message (see above)."""
        self.slow_until[name] = max(self.slow_until.get(name, 0.0), self.now + seconds)

    def forge(self, src: str, dst: str) -> None:
        """A message claiming to come from ``src`` but not signed by it: authentication drops it."""
        self.forged_dropped += 1

    # --- running --------------------------------------------------------------------------

    def inject(self, src: str, sends: list[Send]) -> None:
        """Put ``src``'s messages on the network (loss, partition and delay apply)."""
        rng = self.rng
        lo, span = self.delay[0], self.delay[1] - self.delay[0]
        for dst, msg in sends:
            self.messages += 1
            self.bytes_sent += msg.size() + ENVELOPE_BYTES
            if (self.loss and rng.random() < self.loss) or (
                self.blocked is not None and self.blocked(src, dst)
            ):
                self.lost += 1
                continue
            self._seq += 1
            t = self.now + lo + rng.random() * span
            heapq.heappush(self._events, (t, self._seq, _DELIVER, dst, src, msg))

    def _drain(self, node: Swim) -> None:
        if node.changes:
            if self.on_change is not None:
                for c in node.changes:
                    self.on_change(node.name, c)
            node.changes.clear()

    def run_until(self, end: float) -> None:
        events = self._events
        nodes = self.nodes
        stalled = self.stalled_until
        slow = self.slow_until
        down = self.down
        while events and events[0][0] <= end:
            t, _, kind, name, src, msg = heapq.heappop(events)
            self.now = t
            if name in down:
                continue
            node = nodes[name]
            if stalled and name in stalled:
                until = stalled[name]
                if t < until:
                    if kind == _DELIVER and self.stall_drop:
                        self.stall_dropped += 1
                        continue
                    self._seq += 1
                    # timers first at the end of the stall, then the queued messages
                    later = until if kind == _WAKE else until + 1e-9
                    if kind == _WAKE:
                        self._wake_at[name] = later
                    heapq.heappush(events, (later, self._seq, kind, name, src, msg))
                    continue
                del stalled[name]
            if slow and kind == _DELIVER and name in slow:
                until = slow[name]
                if t < until:
                    if self.stall_drop:
                        self.stall_dropped += 1
                    else:
                        self._seq += 1
                        heapq.heappush(events, (until + 1e-9, self._seq, kind, name, src, msg))
                    continue
                del slow[name]
            if kind == _WAKE:
                if t != self._wake_at[name]:
                    continue
                self._wake_at[name] = float("inf")
                self.inject(name, node.tick(t))
            else:
                assert msg is not None
                self.inject(name, node.receive(src, msg, t))
            self._drain(node)
            self._schedule(node)
        self.now = end

    def bump(self, name: str) -> int:
        """Make ``name`` announce a new incarnation (the dissemination probe); return it."""
        node = self.nodes[name]
        node.announce(self.now)
        self._schedule(node)
        return node.incarnation

    def alive_nodes(self) -> list[str]:
        return [n for n in self.names if n not in self.down]
