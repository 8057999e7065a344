"""Restarts from the WAL and from nothing (amnesia): the replica must come back and be counted on.

The strongest check that a recovered replica really votes again: after it
recovers, crash a *different* replica. With n = 4 the cluster can then only
make progress if the recovered one takes part.

Replay: ``DWCP_SEED=<seed> pytest tests/consensus/test_sim_recovery.py``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from simcluster import Cluster, seeds
from simnet import Instance, LinkPolicy, Sim

REPLAY = "pytest tests/consensus/test_sim_recovery.py"


class _Recovered:
    """Observer noting when each replica reports ``Recovered``."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def on_action(self, sim: Sim, inst: Instance, action: Any) -> None:
        if type(action).__name__ == "Recovered":
            self.at.setdefault(inst.name, sim.now)

    def after_event(self, sim: Sim) -> None:
        return


HELD_OUT = (696, 1335)
"""Amnesia seeds that stalled before VIEW-CHANGEs were re-sent inside the timeout (issue 19)."""


@pytest.mark.parametrize("amnesia", [False, True], ids=["wal", "amnesia"])
@pytest.mark.parametrize("seed", seeds(12))
def test_restarted_replica_votes_again(seed: int, amnesia: bool) -> None:
    check_votes_again(seed, amnesia)


@pytest.mark.parametrize("seed", HELD_OUT)
def test_amnesiac_replica_recovers_on_held_out_seeds(seed: int) -> None:
    check_votes_again(seed, amnesia=True)


def check_votes_again(seed: int, amnesia: bool) -> None:
    """One schedule: crash a replica, restart it (from its WAL or from nothing), need its vote."""
    rng = random.Random(seed)
    victim = rng.randrange(4)
    other = rng.choice([i for i in range(4) if i != victim])
    c = Cluster(
        seed,
        replay=f"DWCP_SEED={seed} {REPLAY} -k {'amnesia' if amnesia else 'wal'}",
        link=LinkPolicy(drop=rng.choice([0.0, 0.02]), delay_max=0.004),
        quota=40,
        clients=2,
    )
    rec = _Recovered()
    c.sim.observers.append(rec)
    c.sim.at(0.02, lambda: c.sim.crash(f"r{victim}"))
    c.sim.at(0.3, lambda: c.sim.restart(f"r{victim}", amnesia=amnesia))
    c.start()
    c.run(until=6.0)
    name = f"r{victim}"
    if amnesia:
        assert name in rec.at, f"the amnesiac replica never recovered; {c.describe()}"
        assert not c.sim.instances[name].node.recovering  # type: ignore[union-attr]
    # Now the restarted replica is needed for every quorum.
    c.sim.crash(f"r{other}")
    before = dict(c.workload.done)
    c.workload.quota += 5
    for cl in c.client_names:
        c.submit(cl)
    c.run(until=c.sim.now + 30.0)
    assert c.finished(), f"no progress with r{other} down after r{victim} came back; {c.describe()}"
    assert c.workload.done != before
    assert not c.checker.violations
