"""A simulated PBFT cluster: real ``Replica``/``Client`` cores on ``simnet`` with the checker.

Why a separate module: every scenario (random faults, Byzantine, Twins) needs
the same wiring: deterministic keys from the seed, one ``CheckedApp`` per
replica incarnation, crash/restart through the WAL records the sim kept, a
closed-loop workload of registry operations that contend on a few VMs, and a
replay command that names the seed.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from checker import CheckedApp, Checker
from simnet import Instance, LinkPolicy, Sim, SimNode

from dwcp.consensus import Client, ClusterConfig, Replica
from dwcp.consensus.messages import Codec
from dwcp.consensus.registry import decode_result, encode_op
from dwcp.identity import NodeKey

HOSTS = ("h0", "h1", "h2", "h3")


def seeds(default: int, env: str = "DWCP_SIM_SEEDS") -> list[int]:
    """The seeds a parametrized test runs: ``DWCP_SEED`` pins one, ``DWCP_SIM_SEEDS=N`` widens."""
    pinned = os.environ.get("DWCP_SEED")
    if pinned:
        return [int(pinned)]
    return list(range(int(os.environ.get(env, default))))


def key_for(seed_label: str) -> NodeKey:
    return NodeKey(hashlib.blake2b(seed_label.encode(), digest_size=32).digest())


def make_config(
    n: int = 4,
    clients: int = 2,
    *,
    cluster_id: bytes = b"sim",
    **tuning: Any,
) -> tuple[ClusterConfig, list[NodeKey], list[NodeKey]]:
    """Keys are fixed per (index, role): verification caches cannot hide a key mix-up."""
    rkeys = [key_for(f"replica-{i}") for i in range(n)]
    ckeys = [key_for(f"client-{i}") for i in range(clients)]
    base: dict[str, Any] = {
        "checkpoint_interval": 4,
        "watermark_window": 8,
        "max_batch": 4,
        "max_inflight": 2,
        "view_change_timeout": 0.5,
        "client_retry": 0.3,
    }
    base.update(tuning)
    cfg = ClusterConfig(
        cluster_id, tuple(k.public for k in rkeys), tuple(k.public for k in ckeys), **base
    )
    return cfg, rkeys, ckeys


@dataclass
class Workload:
    """Closed-loop clients issuing registry operations that race on a few VMs."""

    rng: random.Random
    quota: int
    vms: tuple[str, ...] = ("vm0", "vm1")
    sent: dict[str, int] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    belief: dict[str, tuple[str, int]] = field(default_factory=dict)
    last_done: float = 0.0

    def next_op(self, client: str) -> bytes:
        vm = self.rng.choice(self.vms)
        owner, epoch = self.belief.get(vm, ("", 0))
        r = self.rng.random()
        if epoch == 0 or r < 0.1:
            return encode_op("register", vm, self.rng.choice(HOSTS))
        if r < 0.2:
            return encode_op("get", vm)
        if r < 0.25:
            return encode_op("release", vm, owner)
        if r < 0.3:
            return b"\xc1garbage-op"
        dst = self.rng.choice([h for h in HOSTS if h != owner])
        return encode_op("migrate", vm, owner, dst, epoch)

    def learn(self, op: bytes, result: bytes) -> None:
        res = decode_result(result)
        try:
            items = msgpack.unpackb(op, use_list=False, raw=False)
            vm = items[1]
        except Exception:
            return
        if type(vm) is str:
            self.belief[vm] = (res.owner, res.epoch)


class Cluster:
    """Builds and drives one simulated cluster; ``run()`` returns when the workload is done."""

    def __init__(
        self,
        seed: int,
        *,
        replay: str,
        n: int = 4,
        clients: int = 2,
        quota: int = 6,
        link: LinkPolicy | None = None,
        byzantine: Callable[[Cluster, int], Callable[[SimNode], SimNode]] | None = None,
        byzantine_ids: tuple[int, ...] = (),
        twins: tuple[int, ...] = (),
        raise_on_violation: bool = True,
        replica_cls: Callable[..., Any] = Replica,
        **tuning: Any,
    ) -> None:
        self.replica_cls = replica_cls
        self.seed = seed
        self.sim = Sim(seed, link=link)
        self.rng = random.Random(seed * 7919 + 1)
        self.config, self.rkeys, self.ckeys = make_config(n, clients, **tuning)
        self.checker = Checker(
            replay=replay,
            raise_on_violation=raise_on_violation,
            clients=frozenset(k.public.raw for k in self.ckeys),
            codec=Codec(self.config),
        )
        self.sim.observers.append(self.checker)
        self.sim.taps.append(self.checker.tap(self.sim))
        self.sim.observers.append(_WorkloadDriver(self))
        self.workload = Workload(random.Random(seed * 31 + 7), quota)
        self.byzantine_ids = set(byzantine_ids) | set(twins)
        self.wrap = byzantine
        self.adversaries: list[Any] = []
        for i in range(n):
            copies = [f"r{i}", f"r{i}'"] if i in twins else [f"r{i}"]
            for name in copies:
                self.sim.add(name, i, self._replica_factory(i), byzantine=i in self.byzantine_ids)
        self.client_names: list[str] = []
        for j, ck in enumerate(self.ckeys):
            name = f"c{j}"
            self.client_names.append(name)
            self.sim.add(name, ck.public.raw, self._client_factory(ck), kind="client")
            self.workload.sent[name] = 0
            self.workload.done[name] = 0

    # --- factories ---------------------------------------------------------

    def _replica_factory(self, rid: int) -> Callable[[Instance, float], tuple[SimNode, list[Any]]]:
        def build(inst: Instance, now: float) -> tuple[SimNode, list[Any]]:
            app = CheckedApp(self.checker, self.sim, inst)
            self.checker.app_of[(inst.name, inst.incarnation)] = app
            rep = self.replica_cls(self.config, rid, self.rkeys[rid], app, recovering=inst.amnesiac)
            actions = rep.recover(list(inst.store), now)
            node: SimNode = rep
            if self.wrap is not None and rid in self.byzantine_ids:
                node = self.wrap(self, rid)(rep)
            return node, list(actions)

        return build

    def _client_factory(
        self, key: NodeKey
    ) -> Callable[[Instance, float], tuple[SimNode, list[Any]]]:
        def build(inst: Instance, now: float) -> tuple[SimNode, list[Any]]:
            return _ClientNode(Client(self.config, key)), []

        return build

    # --- driving -----------------------------------------------------------

    def submit(self, name: str) -> None:
        wl = self.workload
        if wl.sent[name] >= wl.quota:
            return
        inst = self.sim.instances[name]
        node = inst.node
        assert isinstance(node, _ClientNode)
        if node.client.busy:
            return
        op = wl.next_op(name)
        wl.sent[name] += 1
        self.sim.call_node(name, lambda nd: node.client.request(op, self.sim.now))

    def start(self, at: float = 0.001) -> None:
        for k, name in enumerate(self.client_names):
            self.sim.at(at + k * 0.0003, lambda name=name: self.submit(name))

    def finished(self) -> bool:
        wl = self.workload
        return all(wl.done[c] >= wl.quota for c in self.client_names)

    def run(self, until: float) -> None:
        self.sim.run(until, stop=self.finished)

    def pending(self) -> dict[str, int]:
        wl = self.workload
        return {c: wl.quota - wl.done[c] for c in self.client_names if wl.done[c] < wl.quota}

    def describe(self) -> str:
        return (
            f"seed {self.seed}: t={self.sim.now:.3f} events={self.sim.events} "
            f"pending={self.pending()} {self.checker.summary()}\n  replay: {self.checker.replay}"
        )


class _ClientNode:
    """Adapts ``Client`` to the simulator (its ``receive`` returns events, not actions)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def receive(self, data: bytes, now: float) -> list[Any]:
        return list(self.client.receive(data, now))

    def tick(self, now: float) -> list[Any]:
        return list(self.client.tick(now))

    def next_deadline(self) -> float | None:
        return self.client.next_deadline()


@dataclass
class _WorkloadDriver:
    """Observer: on each client completion, record it and issue the next request."""

    cluster: Cluster

    def on_action(self, sim: Sim, inst: Instance, action: Any) -> None:
        if inst.kind != "client" or type(action).__name__ != "Completed":
            return
        wl = self.cluster.workload
        wl.done[inst.name] += 1
        wl.last_done = sim.now
        wl.learn(action.op, action.result)
        think = wl.rng.uniform(0.0, 0.002)
        sim.at(sim.now + think, lambda: self.cluster.submit(inst.name))

    def after_event(self, sim: Sim) -> None:
        return
