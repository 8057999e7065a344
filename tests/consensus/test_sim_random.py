"""Random fault schedules over many seeds: safety at every step, liveness after healing.

Each seed draws a lossy, duplicating, reordering network and one fault
schedule with at most f = 1 faulty replica at a time (crash, crash and restart
from the WAL, restart with the log wiped, a crashed primary, a crash cascade
into view v+2, an isolated replica, a 2-2 split, flapping partitions, a crash part-way through
an action list). After
the last fault the network stops losing messages, every client request must
complete within ``liveness_bound``, and honest replicas enter at most 2 new
views (the research notes' goal).

Replay one seed exactly: ``DWCP_SEED=<seed> pytest tests/consensus/test_sim_random.py``;
run more: ``DWCP_SIM_SEEDS=2000 pytest tests/consensus/test_sim_random.py``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from simcluster import Cluster, seeds
from simnet import Instance, LinkPolicy, Sim

FAULTS = (
    "none",
    "crash",
    "restart",
    "amnesia",
    "primary",
    "cascade",
    "isolate",
    "isolate-primary",
    "split",
    "flap",
    "torn",
)


def liveness_bound(heal: float, fault_span: float, vc_timeout: float) -> float:
    """Time by which every request must be done.

    After healing a replica may still wait out a view-change timer that doubled
    while the fault lasted (at most twice the fault's duration), and a client
    its retry back-off (the same bound); then a bounded number of view changes
    must be enough.
    """
    return heal + 2 * fault_span + 12 * vc_timeout


def build(seed: int) -> tuple[Cluster, float, float, str]:
    rng = random.Random(seed ^ 0x5EED)
    link = LinkPolicy(
        drop=rng.choice([0.0, 0.0, 0.02, 0.05, 0.1]),
        dup=rng.choice([0.0, 0.05, 0.2]),
        delay_min=0.0002,
        delay_max=rng.choice([0.002, 0.01, 0.05]),
    )
    c = Cluster(
        seed,
        replay=f"DWCP_SEED={seed} pytest tests/consensus/test_sim_random.py",
        link=link,
        quota=rng.randint(3, 6),
        clients=rng.choice([1, 2, 3]),
    )
    sim = c.sim
    # Half the seeds hand replicas what arrived within a short window in one receive_batch
    # (as the network binding does per event-loop turn): batch boundaries move, safety not.
    sim.batch_window = rng.choice([0.0, 0.002])
    fault = FAULTS[seed % len(FAULTS)]
    victim = f"r{rng.randrange(4)}"
    t1 = rng.uniform(0.001, 0.05)
    t2 = t1 + rng.uniform(0.05, 1.5)
    heal = t1
    if fault == "crash":
        sim.at(t1, lambda: sim.crash(victim))
    elif fault in ("restart", "amnesia", "primary"):
        who = "r0" if fault == "primary" else victim
        sim.at(t1, lambda: sim.crash(who))
        sim.at(t2, lambda: sim.restart(who, amnesia=fault == "amnesia"))
        heal = t2
    elif fault == "torn":
        who = victim if rng.random() < 0.5 else "r0"
        sim.at(t1, lambda: sim.crash_midway(who))
        sim.at(t2, lambda: sim.restart(who))
        heal = t2
    elif fault == "cascade":
        t3 = t2 + rng.uniform(0.01, 0.5)
        sim.at(t1, lambda: sim.crash("r0"))
        sim.at(t2, lambda: sim.restart("r0"))
        sim.at(t2 + 0.0001, lambda: sim.crash("r1"))
        sim.at(t3, lambda: sim.restart("r1"))
        heal = t3
    elif fault in ("isolate", "isolate-primary"):
        who = "r0" if fault == "isolate-primary" else victim
        others = [n for n in sim.instances if n != who]
        sim.partition(t1, t2, {who}, others)
        heal = t2
    elif fault == "split":
        names = list(sim.instances)
        side = {n for n in names if n in ("r0", "r1") or (n.startswith("c") and rng.random() < 0.5)}
        sim.partition(t1, t2, side, set(names) - side)
        heal = t2
    elif fault == "flap":
        t = t1
        for _ in range(rng.randint(2, 5)):
            who = f"r{rng.randrange(4)}"
            d = rng.uniform(0.01, 0.4)
            sim.partition(t, t + d, {who}, [n for n in sim.instances if n != who])
            t += d + rng.uniform(0.0, 0.2)
        heal = t
    calm = LinkPolicy(drop=0.0, dup=link.dup, delay_min=link.delay_min, delay_max=link.delay_max)

    def settle() -> None:
        sim.default_link = calm

    sim.at(heal, settle)
    return c, heal, heal - t1, fault


class _ViewsAfter:
    """Counts the views honest replicas enter after ``heal``."""

    def __init__(self, heal: float) -> None:
        self.heal = heal
        self.views: set[int] = set()

    def on_action(self, sim: Sim, inst: Instance, action: Any) -> None:
        if type(action).__name__ == "ViewChanged" and sim.now > self.heal and not inst.byzantine:
            self.views.add(action.view)

    def after_event(self, sim: Sim) -> None:
        return


@pytest.mark.parametrize("seed", seeds(150))
def test_random_faults(seed: int) -> None:
    c, heal, span, fault = build(seed)
    after = _ViewsAfter(heal)
    c.sim.observers.append(after)
    c.start()
    bound = liveness_bound(heal, span, c.config.view_change_timeout)
    c.run(until=bound)
    assert c.finished(), f"liveness ({fault}): requests pending at {bound:.2f}s; {c.describe()}"
    assert not c.checker.violations
    # research notes' liveness goal: at most 2 view changes once the network has healed
    assert len(after.views) <= 2, f"views {sorted(after.views)} after heal; {c.describe()}"
