"""One Byzantine replica (f = 1) with real keys: safety always, liveness after the network heals.

Replay one seed: ``DWCP_SEED=<seed> pytest tests/consensus/test_byzantine.py -k <behaviour>``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from adversary import BogusNewView, DoubleVoter, Equivocator, Forger, Spray, wrapper
from simcluster import Cluster, key_for, seeds
from simnet import LinkPolicy

from dwcp.consensus.messages import Commit, Prepare

REPLAY = "pytest tests/consensus/test_byzantine.py"
BOUND = 30.0  # virtual seconds; the schedules below heal by ~2 s


def _cluster(seed: int, test: str, **kw: Any) -> Cluster:
    rng = random.Random(seed)
    link = LinkPolicy(drop=rng.choice([0.0, 0.02]), dup=rng.choice([0.0, 0.1]), delay_max=0.005)
    c = Cluster(
        seed,
        replay=f"DWCP_SEED={seed} {REPLAY} -k {test}",
        link=link,
        quota=5,
        max_message_bytes=1 << 16,
        **kw,
    )
    c.sim.batch_window = rng.choice([0.0, 0.002])  # honest replicas: receive_batch half the time
    return c


def _finish(c: Cluster, heal: float = 0.0) -> None:
    c.start()
    c.sim.at(heal, lambda: setattr(c.sim, "default_link", LinkPolicy(delay_max=0.005)))
    c.run(until=heal + BOUND)
    assert c.finished(), f"liveness: {c.describe()}"
    assert not c.checker.violations


def _isolate_primary(c: Cluster, start: float, end: float) -> None:
    c.sim.partition(start, end, {"r0"}, [n for n in c.sim.instances if n != "r0"])


@pytest.mark.parametrize("seed", seeds(12))
def test_equivocating_primary(seed: int) -> None:
    c = _cluster(seed, "equivocating", byzantine=wrapper(Equivocator), byzantine_ids=(0,))
    _finish(c)


@pytest.mark.parametrize("seed", seeds(12))
def test_double_voting_backup(seed: int) -> None:
    rid = 1 + seed % 3
    c = _cluster(seed, "double_voting", byzantine=wrapper(DoubleVoter), byzantine_ids=(rid,))
    if seed % 2:
        _isolate_primary(c, 0.01, 0.8)  # votes double during a view change too
    _finish(c, 0.8 if seed % 2 else 0.0)


@pytest.mark.parametrize("mode", ["drop-o", "swap-o", "extra-o", "forge-vc", "bad-cert", None])
@pytest.mark.parametrize("seed", seeds(3))
def test_bogus_new_view(seed: int, mode: str | None) -> None:
    """Replica 1 (primary of view 1) sends a wrong NEW-VIEW; honest replicas move to view 2."""
    c = _cluster(
        seed, "bogus_new_view", byzantine=wrapper(BogusNewView, mode=mode), byzantine_ids=(1,)
    )
    _isolate_primary(c, 0.01, 1.5)
    _finish(c, 1.5)
    forged = sum(getattr(a, "forged", 0) for a in c.adversaries)
    assert forged > 0, "the scenario never reached a NEW-VIEW from the Byzantine primary"


@pytest.mark.parametrize("seed", seeds(12))
def test_forged_malformed_and_foreign_messages(seed: int) -> None:
    rid = seed % 4
    c = _cluster(seed, "forged", byzantine=wrapper(Forger), byzantine_ids=(rid,))
    if seed % 3 == 0:
        _isolate_primary(c, 0.01, 0.8)
    _finish(c, 0.8)
    honest = [i.node for i in c.sim.honest_replicas() if i.node is not None]
    dropped = sum(sum(v for k, v in r.stats.items() if k not in _BENIGN) for r in honest)
    assert dropped > 0, [dict(r.stats) for r in honest]


_BENIGN = {"duplicate", "late_vote", "retransmissions", "views_entered", "stable_checkpoints"}


@pytest.mark.parametrize("seed", seeds(12))
def test_replays_and_other_cluster_traffic(seed: int) -> None:
    """A network adversary replays old views/sequence numbers and re-signs for another cluster."""
    c = _cluster(seed, "replays")
    spray = Spray(c.sim, c.config, c.rkeys, random.Random(seed + 99))
    spray.every(0.003, until=3.0)
    if seed % 2:
        _isolate_primary(c, 0.02, 0.7)
    _finish(c, 0.7)
    assert spray.injected > 0


@pytest.mark.parametrize("seed", seeds(6))
def test_crash_plus_byzantine_would_exceed_f_but_stays_safe(seed: int) -> None:
    """Safety needs no bound on crashes of honest nodes beyond f: only liveness does."""
    c = _cluster(
        seed,
        "exceed_f",
        byzantine=wrapper(DoubleVoter),
        byzantine_ids=(2,),
        raise_on_violation=True,
    )
    c.start()
    c.sim.at(0.01, lambda: c.sim.crash("r3"))
    c.run(until=3.0)
    assert not c.checker.violations


def _mutants(raw: bytes, c: Cluster, rng: random.Random) -> list[bytes]:
    from adversary import other_cluster

    from dwcp.consensus.messages import Codec

    codec = Codec(c.config)
    s = codec.decode(raw)
    signer = c.rkeys[s.sender] if s.kind.name != "REQUEST" else c.ckeys[s.sender]
    out = [
        raw[: rng.randrange(len(raw))],
        raw + b"\x00",
        rng.randbytes(rng.randrange(1, 200)),
        bytes(c.config.max_message_bytes + 1),
        Codec(other_cluster(c.config)).encode(s.msg, s.sender, signer),
    ]
    for _ in range(6):
        b = bytearray(raw)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    if s.kind.name != "REQUEST":
        wrong = (s.sender + 1) % c.config.n
        out.append(codec.encode(s.msg, wrong, signer))  # another replica's id, own key
    return out


def _state(rep: Any) -> tuple[Any, ...]:
    return (rep.view, rep.last_executed, rep.stable_seq, rep.app.digest(), rep.recovering)


@pytest.mark.parametrize("seed", seeds(4))
def test_invalid_input_changes_nothing(seed: int) -> None:
    """Corrupted, misattributed or foreign copies of real traffic: nothing persisted or changed.

    (That they also trigger no messages is ``test_unauthenticated_*`` below.)
    """
    c = _cluster(seed, "invalid_input")
    captured: list[bytes] = []
    c.sim.taps.append(lambda s, d, data: captured.append(data) if len(captured) < 400 else None)
    c.sim.partition(0.01, 0.6, {"r0"}, [n for n in c.sim.instances if n != "r0"])
    _finish(c, 0.6)
    rng = random.Random(seed)
    sample = rng.sample(captured, min(60, len(captured)))
    for inst in c.sim.honest_replicas():
        rep: Any = inst.node
        before = _state(rep)
        for raw in sample:
            for bad in _mutants(raw, c, rng):
                acts = rep.receive(bad, c.sim.now)
                kinds = {type(a).__name__ for a in acts}
                assert kinds <= {"Send"}, f"seed {seed}: {bad[:40]!r} caused {kinds}"
        assert _state(rep) == before


# --- unauthenticated input must not make a replica act (fixed: see consensus-bugs.md) --------


def _forged(c: Cluster, msg: Any, sender: int) -> bytes:
    """``msg`` claiming ``sender`` but signed by a key outside the cluster."""
    from dwcp.consensus.messages import Codec

    return Codec(c.config).encode(msg, sender, key_for("outsider"))


def _settled(seed: int = 3) -> Cluster:
    c = _cluster(seed, "unauthenticated")
    _isolate_primary(c, 0.01, 0.6)  # ends in view >= 1, so replicas hold a NEW-VIEW
    _finish(c, 0.6)
    return c


def test_unauthenticated_votes_ahead_start_no_state_fetch() -> None:
    c = _settled()
    rep: Any = c.sim.instances["r3"].node
    far = rep.stable_seq + c.config.watermark_window + 5
    acts: list[Any] = []
    for sender in (1, 2):
        vote = Prepare(rep.view, far, bytes(32))
        acts += rep.receive(_forged(c, vote, sender), c.sim.now)
    assert acts == [], acts  # today: Send(FETCH-STATE) to replicas 1 and 2


def test_unauthenticated_old_view_vote_gets_no_new_view_pushed() -> None:
    c = _settled()
    rep: Any = c.sim.instances["r3"].node
    assert rep.view >= 1
    acts = rep.receive(_forged(c, Commit(rep.view - 1, 1, bytes(32)), 2), c.sim.now)
    assert acts == [], acts  # today: Send(2, NEW-VIEW), a large message, to a spoofed sender


def test_unauthenticated_future_view_votes_are_not_buffered() -> None:
    c = _settled()
    rep: Any = c.sim.instances["r3"].node
    before = rep.stats["buffered"]
    rep.receive(_forged(c, Prepare(rep.view + 1, 1, bytes(32)), 2), c.sim.now)
    # today: buffered, evicting replica 2's genuine future-view messages from its bounded queue
    assert rep.stats["buffered"] == before


@pytest.mark.parametrize("amnesia", [False, True], ids=["wal", "amnesia"])
@pytest.mark.parametrize("seed", seeds(4))
def test_lying_state_checkpoint_status_and_replies(seed: int, amnesia: bool) -> None:
    """A replica that lies in STATE/CHECKPOINT/STATUS/REPLY while another one restarts behind.

    The restarted replica must state-transfer from honest replicas only. With amnesia the
    lagging replica and the liar are two faults, so only safety is required there.
    """
    from adversary import Liar

    liar = seed % 4
    victim = (liar + 1 + seed % 3) % 4
    c = _cluster(seed, "lying", byzantine=wrapper(Liar), byzantine_ids=(liar,))
    c.workload.quota = 25
    c.sim.at(0.01, lambda: c.sim.crash(f"r{victim}"))
    c.sim.at(0.4, lambda: c.sim.restart(f"r{victim}", amnesia=amnesia))
    c.start()
    c.run(until=20.0)
    assert not c.checker.violations
    if not amnesia:
        assert c.finished(), f"liveness: {c.describe()}"
    assert sum(a.sent for a in c.adversaries) > 0


@pytest.mark.parametrize("seed", seeds(8))
def test_equivocating_and_replaying_client(seed: int) -> None:
    """A faulty client: same timestamp with different ops per replica, replays, stale stamps."""
    from adversary import EvilClient

    c = _cluster(seed, "client", clients=3)
    evil = c.ckeys[2]
    rng = random.Random(seed)
    node = EvilClient(c.config, 2, evil, rng)
    # Replace the workload's third client by the adversary (same key, same address).
    c.client_names.remove("c2")
    inst = c.sim.instances["c2"]
    inst.factory = lambda i, now: (node, [])
    inst.byzantine = True
    c.sim.restart("c2")
    if seed % 2:
        _isolate_primary(c, 0.05, 0.6)
    _finish(c, 0.6)
    executed = {k for k in c.checker.results if k[0] == evil.public.raw}
    assert executed, "the faulty client's requests never executed"


@pytest.mark.parametrize("seed", seeds(6))
def test_view_changes_with_stale_but_genuine_certificates(seed: int) -> None:
    """One replica's VIEW-CHANGEs carry real but older (or missing) prepared certificates,
    while the primary is cut off again and again: the highest-view certificate must win."""
    from adversary import StaleCerts

    rid = 1 + seed % 3
    c = _cluster(seed, "stale_certs", byzantine=wrapper(StaleCerts), byzantine_ids=(rid,))
    c.workload.quota = 15
    rng = random.Random(seed)
    t = 0.01
    for k in range(3):  # cut off the primaries of views 0, 1, 2 in turn
        victim = f"r{k}"
        d = rng.uniform(0.9, 1.4)  # longer than client retry + view-change timeout
        c.sim.partition(t, t + d, {victim}, [n for n in c.sim.instances if n != victim])
        t += d + rng.uniform(0.05, 0.4)
    _finish(c, t)
    assert sum(a.rewritten for a in c.adversaries) > 0


@pytest.mark.parametrize("seed", seeds(8))
def test_primary_forging_client_requests(seed: int) -> None:
    """A primary batches requests it signed itself in an authorised client's name: backups
    must not prepare them, nobody executes them, and the primary is replaced."""
    from adversary import RequestForger

    c = _cluster(seed, "forging_client", byzantine=wrapper(RequestForger), byzantine_ids=(0,))
    _finish(c)
    assert sum(a.sent for a in c.adversaries) > 0


@pytest.mark.parametrize("seed", seeds(6))
def test_lying_batched_replies(seed: int) -> None:
    """Batches answered by one REPLIES each, one replica lying in them: clients take f+1 truths."""
    from adversary import Liar

    from dwcp.consensus.messages import Codec, Kind

    liar = seed % 4
    c = _cluster(
        seed,
        "batched_replies",
        byzantine=wrapper(Liar),
        byzantine_ids=(liar,),
        clients=6,
        max_inflight=1,
    )
    codec = Codec(c.config)
    kinds: list[Kind] = []

    def tap(src: str, dst: str, data: bytes) -> None:
        if src.startswith("r") and dst.startswith("c"):
            kinds.append(codec.decode(data).kind)

    c.sim.taps.append(tap)
    _finish(c)
    assert Kind.REPLIES in kinds, "no batch of several requests formed"
    assert sum(a.sent for a in c.adversaries) > 0
