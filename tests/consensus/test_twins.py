"""Twins (Bano et al., OPODIS'21): two instances of one replica share its key and id.

The network splits traffic between the twins with partitions that change
every round, which yields equivocation, double votes and lost state from
honest code. One twin pair is one Byzantine replica (f = 1): safety must hold
for every seed, and requests must complete once the twin is cut off and the
network heals. Two twin pairs exceed f: the negative control requires the
checker to report a violation, proving it can fail.

Replay: ``DWCP_SEED=<seed> pytest tests/consensus/test_twins.py``.
"""

from __future__ import annotations

import random

import pytest
from simcluster import Cluster, seeds
from simnet import LinkPolicy

REPLAY = "pytest tests/consensus/test_twins.py"


def _random_rounds(c: Cluster, rng: random.Random, rounds: int, length: float) -> float:
    names = list(c.sim.instances)
    t = 0.0
    for _ in range(rounds):
        k = rng.choice([1, 2, 2, 3])
        groups: list[set[str]] = [set() for _ in range(k)]
        for n in names:
            groups[rng.randrange(k)].add(n)
        c.sim.partition(t, t + length, *groups)
        t += length
    return t


@pytest.mark.parametrize("seed", seeds(40, "DWCP_TWINS_SEEDS"))
def test_one_twin_pair_is_safe_and_live(seed: int) -> None:
    rng = random.Random(seed)
    twin = rng.randrange(4)
    c = Cluster(
        seed,
        replay=f"DWCP_SEED={seed} {REPLAY} -k one_twin",
        twins=(twin,),
        quota=4,
        link=LinkPolicy(delay_max=rng.choice([0.002, 0.02])),
    )
    end = _random_rounds(c, rng, rng.randint(2, 6), rng.choice([0.05, 0.3, 0.8]))
    split = random.Random(seed + 1)

    def route(src: str, targets: list[str], data: bytes) -> list[str]:
        # Both twins reachable: the network hands each message to one of them, or to both.
        live = [t for t in targets if c.sim.reachable(src, t)]
        if len(live) < 2:
            return live
        r = split.random()
        return live if r < 0.3 else [live[0] if r < 0.65 else live[-1]]

    c.sim.route_filter = route
    # After the rounds one twin is cut off for good: the cluster is 3 honest + 1 twin.
    silent = f"r{twin}'" if rng.random() < 0.5 else f"r{twin}"
    c.sim.partition(end, 1e9, [n for n in c.sim.instances if n != silent], {silent})
    c.start()
    c.run(until=end + 40.0)
    assert not c.checker.violations
    assert c.finished(), f"liveness after the twins' rounds: {c.describe()}"


NEGATIVE_SEEDS = list(range(8))


def test_negative_control_two_twin_pairs_break_safety() -> None:
    """f + 1 = 2 Byzantine replicas (twins of 0 and 1): some seed of a fixed set must fail."""
    fired = []
    for seed in NEGATIVE_SEEDS:
        rng = random.Random(seed)
        c = Cluster(
            seed,
            replay=f"{REPLAY} -k negative_control",
            twins=(0, 1),
            clients=2,
            quota=3,
            raise_on_violation=False,
        )
        side_a = {"r0", "r1", "r2", "c0"}
        side_b = {"r0'", "r1'", "r3", "c1"}
        if rng.random() < 0.5:
            c.sim.partition(0.0, 5.0, side_a, side_b)
        else:
            _random_rounds(c, rng, 4, 0.5)
        c.start()
        c.run(until=5.0)
        fired.append(bool(c.checker.violations))
        if fired[-1]:
            assert "agreement" in c.checker.violations[0] or "accepted" in c.checker.violations[0]
    assert any(fired), "the checker never fired with f+1 Byzantine replicas: it cannot fail"


@pytest.mark.parametrize("seed", seeds(6, "DWCP_TWINS_SEEDS"))
def test_replica_restarted_without_its_log_and_without_recovery_is_one_fault(seed: int) -> None:
    """An operator restarts a replica on an empty log *without* ``recovering``: it may vote
    against its own earlier votes, which makes it Byzantine; one such replica is within f."""
    rng = random.Random(seed)
    victim = f"r{rng.randrange(4)}"
    c = Cluster(
        seed,
        replay=f"DWCP_SEED={seed} {REPLAY} -k without_its_log",
        quota=8,
        link=LinkPolicy(drop=rng.choice([0.0, 0.05]), delay_max=0.01),
    )
    inst = c.sim.instances[victim]
    inst.byzantine = True

    def wipe_and_restart() -> None:
        c.sim.crash(victim)
        inst.store.clear()  # the log is gone, but the replica is not told
        c.sim.restart(victim)

    for k in range(3):
        c.sim.at(0.01 + k * rng.uniform(0.05, 0.4), wipe_and_restart)
    c.start()
    c.run(until=40.0)
    assert not c.checker.violations
    assert c.finished(), c.describe()
