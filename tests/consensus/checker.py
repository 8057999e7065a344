"""Safety and liveness checker for simulated PBFT runs.

Why: a simulator only finds bugs if something notices them the moment they
happen. The checker sees every action of every instance (``on_action``), every
operation applied to an honest replica's registry (``CheckedApp``), and runs
its cross-checks after every event (``after_event``). A violation records the
seed's one-line replay command and, by default, raises at once.

Safety (honest replicas only; Byzantine instances are ignored):
- agreement: no two honest replicas commit different batch digests at one
  sequence number, nor execute different requests at one (seq, index in
  batch) slot; each incarnation executes in increasing sequence order, so logs
  are prefixes of one another;
- every honest replica's registry state after a slot is the same;
- each (client, timestamp) executes at most once per replica incarnation (a
  restarted replica rebuilds its state, so it may execute again from scratch);
- the registry: at most one VM changes per operation, a successful MIGRATE
  moves the VM from its owner ``from`` to ``to`` and raises the epoch by exactly
  one, failed operations and reads change nothing, epochs never go back;
- clients never accept two different results for one request, and an accepted
  result is what honest replicas executed.

Liveness is checked by the scenarios (``pending()`` after the network heals).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from simnet import Instance, Sim

from dwcp.consensus.registry import VMRegistry, decode_result
from dwcp.errors import ProtocolError


class SafetyViolation(AssertionError):
    """The checker saw a run that breaks a safety property."""


_MISSING = object()


class CheckedApp:
    """A ``VMRegistry`` that checks every transition and remembers the state after it."""

    def __init__(self, checker: Checker, sim: Sim, inst: Instance) -> None:
        self.inner = VMRegistry()
        self.checker = checker
        self.sim = sim
        self.inst = inst
        self.post: list[bytes] = []
        self.ops = 0

    def _state(self) -> dict[str, tuple[str, int]]:
        return {vm: (o, e) for vm, o, e in self.inner.items()}

    def execute(self, op: bytes, client: bytes = b"") -> bytes:
        before = self._state()
        result = self.inner.execute(op, client)
        after = self._state()
        self.ops += 1
        if not self.inst.byzantine:
            self.checker.transition(self.sim, self.inst, op, result, before, after)
            self.post.append(self.inner.digest())
            self.checker.dirty.add(id(self))
            self.checker.live_apps[id(self)] = self
        return result

    def snapshot(self) -> bytes:
        return self.inner.snapshot()

    def restore(self, data: bytes) -> None:
        self.inner.restore(data)
        self.post.clear()

    def digest(self) -> bytes:
        return self.inner.digest()


@dataclass
class Checker:
    """Observer that checks safety after every simulated event."""

    replay: str
    raise_on_violation: bool = True
    # Authorised client keys and a codec of the cluster (both optional): executed
    # requests must come from these clients, and a client's proof must be f+1 valid,
    # distinct, matching signed replies.
    clients: frozenset[bytes] = frozenset()
    codec: Any = None
    # (client key, timestamp) of every request honest clients signed (filled by a tap);
    # None disables the check.
    issued: set[tuple[bytes, int]] | None = None
    violations: list[str] = field(default_factory=list)
    # seq -> (batch digest, instance that committed it first)
    batches: dict[int, tuple[bytes, str]] = field(default_factory=dict)
    # (seq, index in batch) -> (request digest, instance)
    log: dict[tuple[int, int], tuple[bytes, str]] = field(default_factory=dict)
    # (client, ts) -> result computed by honest replicas
    results: dict[tuple[bytes, int], bytes] = field(default_factory=dict)
    # slot -> (registry digest after it, instance)
    states: dict[tuple[int, int], tuple[bytes, str]] = field(default_factory=dict)
    last_slot: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    once: dict[tuple[str, int], set[tuple[bytes, int]]] = field(default_factory=dict)
    accepted: dict[tuple[bytes, int], bytes] = field(default_factory=dict)
    executions: int = 0
    commits: int = 0
    view_changes: int = 0
    completions: int = 0
    state_checks: int = 0
    # apps touched in the current event, and the Executed slots they produced
    dirty: set[int] = field(default_factory=set)
    live_apps: dict[int, CheckedApp] = field(default_factory=dict)
    pending_slots: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    app_of: dict[tuple[str, int], CheckedApp] = field(default_factory=dict)

    def fail(self, sim: Sim, what: str) -> None:
        msg = f"seed {sim.seed} t={sim.now:.4f}: {what}\n  replay: {self.replay}"
        self.violations.append(msg)
        if self.raise_on_violation:
            raise SafetyViolation(msg)

    # --- observer hooks ----------------------------------------------------

    def on_action(self, sim: Sim, inst: Instance, action: Any) -> None:
        kind = type(action).__name__
        if inst.kind == "client":
            if kind == "Completed":
                self._completed(sim, inst, action)
            return
        if inst.byzantine or inst.kind != "replica":
            return
        if kind == "Executed":
            self._executed(sim, inst, action)
        elif kind == "Committed":
            self._committed(sim, inst, action)
        elif kind == "ViewChanged":
            self.view_changes += 1

    def after_event(self, sim: Sim) -> None:
        """Pair each touched registry's post-op states with the slots executed."""
        for key in self.dirty:
            app = self.live_apps[key]
            who = (app.inst.name, app.inst.incarnation)
            slots = self.pending_slots.pop(key, [])
            # A replica replaying its log may execute without reporting; only pair
            # when every execution of this event was reported.
            if len(slots) == len(app.post):
                for slot, dg in zip(slots, app.post, strict=True):
                    self.state_checks += 1
                    prev = self.states.get(slot)
                    if prev is None:
                        self.states[slot] = (dg, who[0])
                    elif prev[0] != dg:
                        self.fail(
                            sim,
                            f"{who[0]}: registry after slot {slot} differs from {prev[1]}'s",
                        )
            app.post.clear()
        self.dirty.clear()
        self.pending_slots.clear()

    # --- replicas ----------------------------------------------------------

    def _committed(self, sim: Sim, inst: Instance, c: Any) -> None:
        self.commits += 1
        known = self.batches.get(int(c.seq))
        if known is None:
            self.batches[int(c.seq)] = (bytes(c.digest), inst.name)
        elif known[0] != bytes(c.digest):
            self.fail(
                sim,
                f"agreement: {inst.name} committed batch {bytes(c.digest).hex()[:16]} at seq "
                f"{c.seq}, {known[1]} committed {known[0].hex()[:16]}",
            )

    def _executed(self, sim: Sim, inst: Instance, ex: Any) -> None:
        self.executions += 1
        seq = int(ex.seq)
        digest = bytes(ex.request_digest)
        who = (inst.name, inst.incarnation)
        prev_seq, prev_idx = self.last_slot.get(who, (0, -1))
        if seq < prev_seq:
            self.fail(sim, f"{inst.name} executed seq {seq} after seq {prev_seq} (not a prefix)")
        slot = (seq, prev_idx + 1 if seq == prev_seq else 0)
        self.last_slot[who] = slot
        key = (bytes(ex.client), int(ex.timestamp))
        if self.clients and key[0] not in self.clients:
            self.fail(sim, f"{inst.name} executed a request of an unauthorised client")
        if self.issued is not None and key not in self.issued and _honest_client(sim, key[0]):
            self.fail(sim, f"{inst.name} executed ts={key[1]} that its client never signed")
        seen = self.once.setdefault(who, set())
        if key in seen:
            self.fail(sim, f"{inst.name} executed request ts={key[1]} of a client twice")
        seen.add(key)
        known = self.log.get(slot)
        if known is None:
            self.log[slot] = (digest, inst.name)
        elif known[0] != digest:
            self.fail(
                sim,
                f"agreement: {inst.name} executed {digest.hex()[:16]} at slot {slot}, "
                f"{known[1]} executed {known[0].hex()[:16]} there",
            )
        res = self.results.get(key)
        if res is None:
            self.results[key] = bytes(ex.result)
        elif res != ex.result:
            self.fail(sim, f"{inst.name} computed another result for ts={key[1]}")
        app = self.app_of.get(who)
        if app is not None:
            self.pending_slots.setdefault(id(app), []).append(slot)

    def transition(
        self,
        sim: Sim,
        inst: Instance,
        op: bytes,
        result: bytes,
        before: dict[str, tuple[str, int]],
        after: dict[str, tuple[str, int]],
    ) -> None:
        """Check one registry operation's effect (called by ``CheckedApp``)."""
        changed = sorted(set(before) ^ set(after) | {v for v in after if before.get(v) != after[v]})
        if len(changed) > 1:
            self.fail(sim, f"{inst.name}: one operation changed VMs {changed}")
        for vm in set(before) & set(after):
            if after[vm][1] < before[vm][1]:
                self.fail(sim, f"{inst.name}: epoch of {vm} went back")
        try:
            res = decode_result(result)
        except ProtocolError:
            self.fail(sim, f"{inst.name}: the registry returned a non-result {result!r:.60}")
            return
        try:
            items = msgpack.unpackb(op, use_list=False, raw=False)
        except Exception:
            items = None
        name = items[0] if type(items) is tuple and items else None
        if not res.ok or name == "get":
            if changed:
                self.fail(sim, f"{inst.name}: a failed or read-only op changed {changed}")
            return
        assert type(items) is tuple
        if name == "migrate":
            vm, src, dst, expected = items[1:]
            if before.get(vm) != (src, expected) or after.get(vm) != (dst, expected + 1):
                self.fail(
                    sim,
                    f"{inst.name}: MIGRATE {vm} {src}->{dst}@{expected} took "
                    f"{before.get(vm)} to {after.get(vm)}",
                )
        elif name == "register":
            vm, owner = items[1:]
            if vm in before or after.get(vm) != (owner, 1):
                self.fail(sim, f"{inst.name}: REGISTER {vm} gave {after.get(vm)}")
        elif name == "release":
            vm, owner = items[1:]
            if before.get(vm, ("", 0))[0] != owner or vm in after:
                self.fail(sim, f"{inst.name}: RELEASE {vm} by {owner} from {before.get(vm)}")

    # --- clients -------------------------------------------------------------

    def _completed(self, sim: Sim, inst: Instance, ev: Any) -> None:
        self.completions += 1
        client = inst.address
        assert isinstance(client, bytes)
        key = (client, int(ev.timestamp))
        prev = self.accepted.get(key)
        if prev is not None and prev != ev.result:
            self.fail(sim, f"client {inst.name} accepted two results for ts {key[1]}")
        self.accepted[key] = bytes(ev.result)
        if self.codec is not None:
            self._check_proof(sim, inst, ev)
        executed = self.results.get(key)
        if executed is not None and executed != ev.result:
            self.fail(
                sim,
                f"client {inst.name} accepted {ev.result!r:.60} for ts {key[1]}; honest "
                f"replicas executed {executed!r:.60}",
            )

    def _check_proof(self, sim: Sim, inst: Instance, ev: Any) -> None:
        """The f+1 replies a client accepted: valid signatures, distinct replicas, same result."""
        cfg = self.codec.config
        senders = set()
        for raw in ev.proof:
            try:
                s = self.codec.open(raw)
            except Exception as exc:
                self.fail(sim, f"client {inst.name} accepted an invalid reply ({exc})")
                return
            m = s.msg
            name = type(m).__name__
            if name == "Reply":
                ok = m.result == ev.result and m.timestamp == ev.timestamp
            elif name == "Replies":
                ok = any(ts == ev.timestamp and r == ev.result for _, ts, r in m.entries)
            else:
                ok = False
            if not ok:
                self.fail(sim, f"client {inst.name} accepted a non-matching reply as proof")
            senders.add(s.sender)
        if len(senders) < cfg.weak_quorum:
            self.fail(sim, f"client {inst.name} accepted {len(senders)} distinct replies < f+1")

    def tap(self, sim: Sim) -> Any:
        """A ``Sim.taps`` hook recording the requests honest clients send."""
        self.issued = set()
        issued = self.issued

        def record(src: str, dst: str, data: bytes) -> None:
            inst = sim.instances.get(src)
            if inst is None or inst.kind != "client" or inst.byzantine or self.codec is None:
                return
            try:
                s = self.codec.decode(data)
            except Exception:
                return
            if type(s.msg).__name__ == "Request":
                issued.add((self.codec.config.clients[s.sender].raw, s.msg.timestamp))

        return record

    def summary(self) -> dict[str, Hashable]:
        return {
            "executions": self.executions,
            "commits": self.commits,
            "view_changes": self.view_changes,
            "completions": self.completions,
            "state_checks": self.state_checks,
        }


def _honest_client(sim: Sim, key: bytes) -> bool:
    """Whether ``key`` belongs to a simulated client that is not an adversary."""
    return any(
        i.kind == "client" and not i.byzantine
        for i in map(sim.instances.get, sim.by_address.get(key, []))
        if i
    )
