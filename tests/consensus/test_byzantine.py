"""One Byzantine replica (f = 1) with real keys: safety always, liveness after the network heals.

Replay one seed: ``DWCP_SEED=<seed> pytest tests/consensus/test_byzantine.py -k <behaviour>``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from adversary import BogusNewView, DoubleVoter, Equivocator, Forger, Spray, wrapper
from simcluster import Cluster, seeds
from simnet import LinkPolicy

REPLAY = "pytest tests/consensus/test_byzantine.py"
BOUND = 30.0  # virtual seconds; the schedules below heal by ~2 s


def _cluster(seed: int, test: str, **kw: Any) -> Cluster:
    rng = random.Random(seed)
    link = LinkPolicy(drop=rng.choice([0.0, 0.02]), dup=rng.choice([0.0, 0.1]), delay_max=0.005)
    return Cluster(
        seed,
        replay=f"DWCP_SEED={seed} {REPLAY} -k {test}",
        link=link,
        quota=5,
        max_message_bytes=1 << 16,
        **kw,
    )


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
