"""The simulator and checker themselves: determinism, fault plumbing, and that the checker fires.

A deliberately non-Byzantine-tolerant ``Sequencer`` (the primary orders, backups
obey) runs on the same harness as the real replica: it must pass fault-free runs
and must be caught when a Twin of its primary equivocates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from checker import Checker, SafetyViolation
from simcluster import Cluster
from simnet import LinkPolicy, Sim

from dwcp.consensus.actions import (
    Action,
    Broadcast,
    Committed,
    Executed,
    Persist,
    ReplyTo,
)
from dwcp.consensus.app import StateMachine
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.messages import Codec, Kind, PrePrepare, Reply, Request, digest
from dwcp.errors import AuthenticationError, ProtocolError
from dwcp.identity import NodeKey


class Sequencer:
    """Primary-ordered replication with no voting: correct only without Byzantine nodes."""

    def __init__(
        self,
        config: ClusterConfig,
        rid: int,
        key: NodeKey,
        app: StateMachine,
        *,
        recovering: bool = False,
    ) -> None:
        self.config, self.id, self.key, self.app = config, rid, key, app
        self.codec = Codec(config)
        self.next_seq = 1
        self.executed = 0
        self.pending: dict[int, PrePrepare] = {}
        self.seen: set[tuple[int, int]] = set()

    def recover(self, records: list[bytes], now: float) -> list[Action]:
        for raw in records:
            self.receive(raw, now)
        return []

    def receive(self, data: bytes, now: float) -> list[Action]:
        try:
            s = self.codec.open(data)
        except (ProtocolError, AuthenticationError):
            return []
        if s.kind is Kind.REQUEST and self.id == 0:
            assert isinstance(s.msg, Request)
            if (s.sender, s.msg.timestamp) in self.seen:
                return []
            self.seen.add((s.sender, s.msg.timestamp))
            pp = PrePrepare(0, self.next_seq, (data,))
            self.next_seq += 1
            raw = self.codec.encode(pp, 0, self.key)
            return [Broadcast(raw), *self._accept(pp, raw)]
        if s.kind is Kind.PRE_PREPARE and s.sender == 0 and isinstance(s.msg, PrePrepare):
            return self._accept(s.msg, data)
        return []

    def _accept(self, pp: PrePrepare, raw: bytes) -> list[Action]:
        out: list[Action] = [Persist(raw)]
        self.pending[pp.seq] = pp
        while self.executed + 1 in self.pending:
            pp = self.pending.pop(self.executed + 1)
            self.executed = pp.seq
            out.append(Committed(pp.seq, 0, pp.digest))
            for req in pp.requests:
                s = self.codec.decode(req)
                assert isinstance(s.msg, Request)
                result = self.app.execute(s.msg.op)
                client = self.config.clients[s.sender].raw
                out.append(Executed(pp.seq, 0, digest(req), client, s.msg.timestamp, result))
                reply = Reply(0, s.sender, s.msg.timestamp, result)
                out.append(ReplyTo(client, self.codec.encode(reply, self.id, self.key)))
        return out

    def tick(self, now: float) -> list[Action]:
        return []

    def next_deadline(self) -> float | None:
        return None


REPLAY = "pytest tests/consensus/test_sim_infra.py"


def _run(seed: int, **kw: Any) -> Cluster:
    c = Cluster(seed, replay=f"DWCP_SEED={seed} {REPLAY}", replica_cls=Sequencer, **kw)
    c.start()
    c.run(until=30.0)
    return c


def test_fault_free_sequencer_completes_and_is_deterministic() -> None:
    a = _run(3, link=LinkPolicy(dup=0.2))
    b = _run(3, link=LinkPolicy(dup=0.2))
    assert a.finished(), a.describe()
    assert a.sim.trace_digest() == b.sim.trace_digest()
    assert a.checker.summary() == b.checker.summary()
    assert _run(4, link=LinkPolicy(dup=0.2)).sim.trace_digest() != a.sim.trace_digest()


def test_crash_restart_replays_the_store() -> None:
    c = Cluster(5, replay=REPLAY, replica_cls=Sequencer, quota=8)
    c.start()
    c.sim.at(0.004, lambda: c.sim.crash("r3"))
    c.sim.at(0.01, lambda: c.sim.restart("r3"))
    c.run(until=30.0)
    assert c.finished(), c.describe()
    assert c.sim.instances["r3"].incarnation == 1


def test_checker_catches_an_equivocating_twin_primary() -> None:
    """Negative control on the harness: a Twin of the sequencer's primary splits the log."""
    fired = []
    for seed in range(5):
        c = Cluster(
            seed,
            replay=REPLAY,
            replica_cls=Sequencer,
            twins=(0,),
            raise_on_violation=False,
        )
        c.sim.partition(0.0, 1.0, {"r0", "r1", "c0"}, {"r0'", "r2", "r3", "c1"})
        c.start()
        c.run(until=2.0)
        fired.append(bool(c.checker.violations))
    assert any(fired)


_REPLAY_SCRIPT = """
import sys
from test_sim_random import build, liveness_bound
for seed in (4, 10):  # crashed primary, torn crash
    c, heal, span, fault = build(seed)
    c.start()
    c.run(until=liveness_bound(heal, span, c.config.view_change_timeout))
    print(seed, fault, c.sim.trace_digest(), c.sim.events, sorted(c.checker.summary().items()))
"""


def test_replay_is_exact_across_processes_and_hash_seeds() -> None:
    """A seed printed by a failing CI run must replay the same run on another machine."""
    here = Path(__file__).resolve().parent
    outs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent.parent)])
        proc = subprocess.run(
            [sys.executable, "-c", _REPLAY_SCRIPT],
            cwd=here,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        outs.append(proc.stdout)
    assert outs[0] == outs[1]
    assert len(outs[0].splitlines()) == 2


def test_partition_blocks_and_heals() -> None:
    sim = Sim(1)
    got: list[tuple[float, bytes]] = []

    class Echo:
        def receive(self, data: bytes, now: float) -> list[Any]:
            got.append((now, data))
            return []

        def tick(self, now: float) -> list[Any]:
            return []

        def next_deadline(self) -> float | None:
            return None

    sim.add("a", "a", lambda i, now: (Echo(), []))
    sim.add("b", "b", lambda i, now: (Echo(), []))
    sim.partition(0.0, 1.0, {"a"}, {"b"})
    sim.at(0.5, lambda: sim.transmit("a", "b", b"lost"))
    sim.at(1.5, lambda: sim.transmit("a", "b", b"kept"))
    sim.run(3.0)
    assert [d for _, d in got] == [b"kept"]


def test_checker_flags_each_violation_kind() -> None:
    sim = Sim(0)
    chk = Checker(replay="x")
    sim.add("r0", 0, lambda i, now: (Sequencer.__new__(Sequencer), []))
    sim.add("r1", 1, lambda i, now: (Sequencer.__new__(Sequencer), []))
    r0, r1 = sim.instances["r0"], sim.instances["r1"]
    d1, d2 = b"\x01" * 32, b"\x02" * 32
    chk.on_action(sim, r0, Committed(1, 0, d1))
    with pytest.raises(SafetyViolation, match="agreement"):
        chk.on_action(sim, r1, Committed(1, 0, d2))
    chk.on_action(sim, r0, Executed(1, 0, d1, b"c", 5, b"r"))
    with pytest.raises(SafetyViolation, match="twice"):
        chk.on_action(sim, r0, Executed(2, 0, d2, b"c", 5, b"r"))
    with pytest.raises(SafetyViolation, match="not a prefix"):
        chk.on_action(sim, r0, Executed(1, 0, d1, b"c", 6, b"r"))
    with pytest.raises(SafetyViolation, match="agreement"):
        chk.on_action(sim, r1, Executed(1, 0, d2, b"c", 5, b"r"))
    with pytest.raises(SafetyViolation, match="MIGRATE"):
        from dwcp.consensus.registry import encode_op

        chk.transition(
            sim,
            r0,
            encode_op("migrate", "vm", "a", "b", 1),
            b"\x93\xa2ok\xa1b\x03",
            {"vm": ("a", 1)},
            {"vm": ("b", 3)},
        )


def test_checker_verifies_client_proofs() -> None:
    from dwcp.consensus.actions import Completed

    c = Cluster(0, replay="x", replica_cls=Sequencer)
    chk, sim = c.checker, c.sim
    client = sim.instances["c0"]
    codec = Codec(c.config)

    def reply(ts: int, i: int, key: int | None = None) -> bytes:
        return codec.encode(Reply(0, 0, ts, b"r"), i, c.rkeys[i if key is None else key])

    chk.on_action(sim, client, Completed(7, b"op", b"r", (reply(7, 1), reply(7, 2))))
    with pytest.raises(SafetyViolation, match="distinct"):
        chk.on_action(sim, client, Completed(8, b"op", b"r", (reply(8, 1), reply(8, 1))))
    forged = reply(9, 2, key=1)  # replica 1's key, claiming to be replica 2
    with pytest.raises(SafetyViolation, match="invalid reply"):
        chk.on_action(sim, client, Completed(9, b"op", b"r", (reply(9, 1), forged)))
    with pytest.raises(SafetyViolation, match="non-matching"):
        chk.on_action(sim, client, Completed(10, b"op", b"r", (reply(10, 1), reply(7, 2))))


def test_checker_catches_execution_of_forged_client_requests() -> None:
    """The sequencer's backups trust the primary's batch: a forging primary must be caught."""
    from adversary import RequestForger, wrapper

    c = Cluster(
        2,
        replay=REPLAY,
        replica_cls=Sequencer,
        byzantine=wrapper(RequestForger),
        byzantine_ids=(0,),
        raise_on_violation=False,
    )
    c.start()
    c.run(until=2.0)
    assert any("never signed" in v for v in c.checker.violations), c.checker.violations[:3]
