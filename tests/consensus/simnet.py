"""Deterministic network simulator for sans-IO consensus nodes.

Why: PBFT bugs hide in rare interleavings (view change during loss, restarts,
equivocation). Running every replica and client in one process on virtual
time, with every random choice drawn from one ``random.Random(seed)``, makes a
failing interleaving replay exactly from its seed.

Model
- An *instance* is one running node object (replica, twin copy, client or
  adversary), named by a string. Several instances may share one *logical
  address* (Twins): a message sent to address ``a`` goes to every live instance
  with that address that the sender can currently reach.
- The network drops, delays (uniformly in ``[delay_min, delay_max]``, which
  also reorders), and duplicates per link, and applies partitions that open
  and heal over virtual time.
- Nodes are duck-typed: ``receive(data, now)``, ``tick(now)`` and
  ``next_deadline()``; the actions they return are recognised by class name
  (``Persist``, ``Compact``, ``Send``, ``Broadcast``, ``ReplyTo``), and every
  action or event (``Executed``, ``Completed``...) is also handed to the
  observers (the checker, the workload driver).
- ``Persist``/``Compact`` update the instance's durable store before the
  following actions of the same list run; a crash drops in-flight deliveries
  and timers (``crash_midway`` crashes part-way through an action list), a
  restart rebuilds the node from its store (or from nothing: amnesia).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol


class SimNode(Protocol):
    def receive(self, data: bytes, now: float) -> list[Any]: ...

    def tick(self, now: float) -> list[Any]: ...

    def next_deadline(self) -> float | None: ...


@dataclass
class LinkPolicy:
    """Fault probabilities and delay range of one directed link."""

    drop: float = 0.0
    dup: float = 0.0
    delay_min: float = 0.0002
    delay_max: float = 0.002


@dataclass
class Partition:
    """Between ``start`` and ``end`` only instances in a common group can talk.

    Instances named in no group are isolated from everyone else.
    """

    start: float
    end: float
    groups: list[frozenset[str]]

    def allows(self, a: str, b: str, now: float) -> bool:
        if not (self.start <= now < self.end):
            return True
        return any(a in g and b in g for g in self.groups)


class Observer(Protocol):
    def on_action(self, sim: Sim, inst: Instance, action: Any) -> None: ...

    def after_event(self, sim: Sim) -> None: ...


@dataclass
class Instance:
    """One running node and its durable store."""

    name: str
    address: Hashable
    factory: Callable[[Instance, float], tuple[SimNode, list[Any]]]
    byzantine: bool = False
    kind: str = "replica"
    node: SimNode | None = None
    up: bool = True
    store: list[Any] = field(default_factory=list)
    timer_gen: int = 0
    timer_at: float | None = None
    incarnation: int = 0
    amnesiac: bool = False


class Sim:
    """Virtual-time event loop, seeded network and fault injection."""

    def __init__(self, seed: int, *, link: LinkPolicy | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.default_link = link or LinkPolicy()
        self.links: dict[tuple[str, str], LinkPolicy] = {}
        self.partitions: list[Partition] = []
        self.instances: dict[str, Instance] = {}
        self.by_address: dict[Hashable, list[str]] = {}
        self.replica_addresses: list[Hashable] = []
        self.observers: list[Observer] = []
        self.max_frame = 32 << 20
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self.events = 0
        self._torn: set[str] = set()
        # Called with (src, dst, data) for every message handed to the network.
        self.taps: list[Callable[[str, str, bytes], None]] = []
        self.delivered = 0
        self._trace = hashlib.blake2b(digest_size=16)
        # Hook: decides, per send, which instances of a multi-instance address
        # receive it (Twins). Default: all reachable ones.
        self.route_filter: Callable[[str, list[str], bytes], list[str]] | None = None
        # > 0: a node with ``receive_batch`` (the replica) gets, together with a message,
        # the others due to it within this many seconds, as a driver's event-loop turn
        # would hand it everything that arrived meanwhile (they arrive early, never late).
        self.batch_window = 0.0

    # --- topology --------------------------------------------------------

    def add(
        self,
        name: str,
        address: Hashable,
        factory: Callable[[Instance, float], tuple[SimNode, list[Any]]],
        *,
        byzantine: bool = False,
        kind: str = "replica",
    ) -> Instance:
        inst = Instance(name, address, factory, byzantine=byzantine, kind=kind)
        self.instances[name] = inst
        self.by_address.setdefault(address, []).append(name)
        if kind == "replica" and address not in self.replica_addresses:
            self.replica_addresses.append(address)
        self._start(inst)
        return inst

    def honest_replicas(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.kind == "replica" and not i.byzantine]

    def link(self, src: str, dst: str) -> LinkPolicy:
        return self.links.get((src, dst), self.default_link)

    def reachable(self, src: str, dst: str) -> bool:
        return all(p.allows(src, dst, self.now) for p in self.partitions)

    def partition(self, start: float, end: float, *groups: Iterable[str]) -> None:
        self.partitions.append(Partition(start, end, [frozenset(g) for g in groups]))

    def heal_time(self) -> float:
        """The time after which no partition is active."""
        return max((p.end for p in self.partitions), default=0.0)

    # --- scheduling ------------------------------------------------------

    def _push(self, at: float, kind: str, payload: Any) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), kind, payload))

    def at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at virtual time ``when`` (fault injection, client submits)."""
        self._push(when, "call", fn)

    def crash(self, name: str) -> None:
        inst = self.instances[name]
        inst.up = False
        inst.node = None
        inst.timer_at = None
        inst.timer_gen += 1

    def restart(self, name: str, *, amnesia: bool = False) -> None:
        inst = self.instances[name]
        self._torn.discard(name)
        if amnesia:
            inst.store.clear()
            inst.amnesiac = True
        inst.up = True
        inst.incarnation += 1
        self._start(inst)

    def _start(self, inst: Instance) -> None:
        """Build the node from its durable store and perform its recovery actions."""
        node, actions = inst.factory(inst, self.now)
        inst.node = node
        self.perform(inst, actions)

    def _rearm(self, inst: Instance) -> None:
        if not inst.up or inst.node is None:
            return
        dl = inst.node.next_deadline()
        if dl is None:
            inst.timer_at = None
            return
        dl = max(dl, self.now)
        if inst.timer_at is not None and inst.timer_at == dl:
            return
        inst.timer_gen += 1
        inst.timer_at = dl
        self._push(dl, "timer", (inst.name, inst.timer_gen))

    # --- network ---------------------------------------------------------

    def transmit(self, src: str, dst_address: Hashable, data: bytes) -> None:
        """Hand ``data`` to the network, addressed to every instance of ``dst_address``."""
        targets = [n for n in self.by_address.get(dst_address, []) if n != src]
        if self.route_filter is not None and len(targets) > 1:
            targets = self.route_filter(src, targets, data)
        for dst in targets:
            self.send_to_instance(src, dst, data)

    def send_to_instance(self, src: str, dst: str, data: bytes) -> None:
        for tap in self.taps:
            tap(src, dst, data)
        pol = self.link(src, dst)
        if self.rng.random() < pol.drop:
            return
        copies = 2 if self.rng.random() < pol.dup else 1
        for _ in range(copies):
            delay = self.rng.uniform(pol.delay_min, pol.delay_max)
            self._push(self.now + delay, "deliver", (src, dst, data))

    def inject(self, src: str, dst: str, data: bytes, delay: float = 0.0) -> None:
        """Deliver raw bytes (adversary traffic) regardless of link faults."""
        self._push(self.now + delay, "deliver", (src, dst, data))

    # --- actions ---------------------------------------------------------

    def crash_midway(self, name: str) -> None:
        """Crash ``name`` part-way through its next non-empty action list.

        Actions before a random cut point happen (records persisted, messages
        sent), the rest never do: a crash between a WAL write and the sends it
        allows, or between two sends.
        """
        self._torn.add(name)

    def perform(self, inst: Instance, actions: list[Any]) -> None:
        if inst.name in self._torn and actions and inst.up:
            self._torn.discard(inst.name)
            cut = self.rng.randrange(len(actions) + 1)
            self.perform(inst, actions[:cut])
            self.crash(inst.name)
            return
        for action in actions:
            kind = type(action).__name__
            if kind == "Persist":
                inst.store.append(action.record)
            elif kind == "Compact":
                inst.store[:] = list(action.records)
            elif kind == "Send":
                self.transmit(inst.name, action.to, action.data)
            elif kind == "Broadcast":
                for addr in self.replica_addresses:
                    if addr != inst.address:
                        self.transmit(inst.name, addr, action.data)
            elif kind == "ReplyTo":
                self.transmit(inst.name, action.client, action.data)
            for obs in self.observers:
                obs.on_action(self, inst, action)
        self._rearm(inst)

    def call_node(self, name: str, fn: Callable[[SimNode], list[Any]]) -> list[Any]:
        """Run ``fn`` on a live node now and perform what it returns."""
        inst = self.instances[name]
        if not inst.up or inst.node is None:
            return []
        actions = fn(inst.node)
        self.perform(inst, actions)
        return actions

    def _take_deliveries(self, dst: str, until: float) -> list[bytes]:
        """Pop the deliveries to ``dst`` due by ``until`` (in order) that would be delivered."""
        keep: list[tuple[float, int, str, Any]] = []
        taken: list[bytes] = []
        while self._heap and self._heap[0][0] <= until:
            entry = heapq.heappop(self._heap)
            _, _, kind, payload = entry
            if kind == "deliver" and payload[1] == dst:
                src, _, data = payload
                if self.reachable(src, dst) and len(data) <= self.max_frame:
                    self.delivered += 1
                    self._trace.update(dst.encode() + len(data).to_bytes(4, "big") + data[-16:])
                    taken.append(data)
                    continue
            keep.append(entry)  # not ours, or not deliverable now: it keeps its own time
        for entry in keep:
            heapq.heappush(self._heap, entry)
        return taken

    def trace_digest(self) -> str:
        """A digest of every delivery so far: equal digests mean an identical run."""
        return self._trace.hexdigest()

    # --- loop ------------------------------------------------------------

    def step(self) -> bool:
        if not self._heap:
            return False
        at, _, kind, payload = heapq.heappop(self._heap)
        self.now = max(self.now, at)
        self.events += 1
        if kind == "deliver":
            src, dst, data = payload
            inst = self.instances[dst]
            if not inst.up or inst.node is None or not self.reachable(src, dst):
                return True
            if len(data) > self.max_frame:
                return True
            self.delivered += 1
            self._trace.update(dst.encode() + len(data).to_bytes(4, "big") + data[-16:])
            node = inst.node
            batch = getattr(node, "receive_batch", None)
            if batch is not None and self.batch_window > 0:
                datas = [data, *self._take_deliveries(dst, self.now + self.batch_window)]
                self.perform(inst, batch(datas, self.now))
            else:
                self.perform(inst, node.receive(data, self.now))
        elif kind == "timer":
            name, gen = payload
            inst = self.instances[name]
            if not inst.up or inst.node is None or gen != inst.timer_gen:
                return True
            inst.timer_at = None
            self.perform(inst, inst.node.tick(self.now))
        else:
            payload()
        for obs in self.observers:
            obs.after_event(self)
        return True

    def run(
        self,
        until: float,
        *,
        stop: Callable[[], bool] | None = None,
        max_events: int = 2_000_000,
    ) -> None:
        """Process events up to virtual time ``until`` (or until ``stop()`` is true)."""
        budget = max_events
        while self._heap and self._heap[0][0] <= until and budget > 0:
            self.step()
            budget -= 1
            if stop is not None and stop():
                return
        if budget <= 0:
            raise RuntimeError(f"seed {self.seed}: event budget exhausted at t={self.now:.3f}")
        if not self._heap or self._heap[0][0] > until:
            self.now = max(self.now, until)
