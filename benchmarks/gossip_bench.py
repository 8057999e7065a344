"""ASS membership (SWIM + Lifeguard) in the seeded virtual-time simulator, beside plain SWIM.

Measures, each run with ``lifeguard`` on and off (plain SWIM: fixed timeouts, no local
health, no nacks, fixed suspicion timeout, no buddy rule), probe period 1 s, gossip every
0.2 s to 3 members (memberlist's LAN defaults):
- dissemination: a new incarnation announced by one member, rounds (gossip intervals of
  0.2 s) until 99.9% and 100% of members hold it;
- detection: a member crashes; seconds until the first suspicion and until every live
  member holds it dead;
- accuracy: no member fails, loss 1/5/10% (independent, per message): false "dead"
  declarations (suspicion timeouts that fired on a live member) and accusations per hour
  of virtual time; and with 10% of members stalling (each alternates 5-15 s running and
  2-5 s doing nothing, its timers firing first on resume) at 1% and 5% loss. With
  ``--stall-model drop`` (the default) a stalled member neither processes nor answers:
  what arrives during the stall is lost; ``queue`` keeps it for the resume. ``slow`` and
  ``slow-drop`` stall only the receive path: the member's timers keep running (it keeps
  probing, timing out and accusing, as a CPU-starved process whose receive loop lags:
  the Lifeguard paper's slow message processing) and what arrives is processed at the
  end of the window (``slow``) or lost (``slow-drop``). ``--stall-len LO,HI`` sets the
  stall length (s). False deaths are split by victim: a stalled member, or one that
  never stalls;
- scale: wall time of 5,000 members x 600 virtual s at 1% loss (one process, one core;
  ``wall_s`` is the run, ``cpu_s`` the CPU time this process got for it (what one
  unshared core would take), ``setup_s`` building the n x n member tables before it);
- gossip bytes per member per second (encoded size + signature envelope).

    python benchmarks/gossip_bench.py [--n 1000] [--big 5000] [--seconds 3600]
        [--scale-seconds 600] [--seed 1] [--only dissem,detect,accuracy,scale]
        [--stall-model drop|queue|slow|slow-drop] [--stall-len 2,5] [--no-stall]
        [--modes lifeguard,plain] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from typing import Any

from dwcp.gossip import DEAD, Change, SwimConfig
from dwcp.gossip.sim import SimNet

GOSSIP_INTERVAL = 0.2
PUSH_PULL: dict[str, Any] = {}  # --push-pull S[,fixed]: SwimConfig's push-pull fields


def dissemination(n: int, seed: int, lifeguard: bool, loss: float) -> dict[str, Any]:
    net = SimNet(n, seed=seed, config=SwimConfig(lifeguard=lifeguard), loss=loss)
    net.run_until(3.0)
    got: dict[str, float] = {}
    inc = 0

    def seen(node: str, c: Change) -> None:
        if c.name == "n0" and c.incarnation >= inc and node not in got:
            got[node] = net.now

    net.on_change = seen
    t0 = net.now
    inc = net.bump("n0")
    t = t0
    while len(got) < n - 1 and t < t0 + 120:
        t += GOSSIP_INTERVAL / 4
        net.run_until(t)
    times = sorted(v - t0 for v in got.values())
    k999 = max(0, -(-(n - 1) * 999 // 1000) - 1)
    s999 = times[k999] if len(times) > k999 else float("inf")
    s100 = times[-1] if len(times) == n - 1 else float("inf")
    return {
        "n": n,
        "loss": loss,
        "lifeguard": lifeguard,
        "s_999": round(s999, 3),
        "s_100": round(s100, 3),
        "rounds_999": round(s999 / GOSSIP_INTERVAL, 1),
        "rounds_100": round(s100 / GOSSIP_INTERVAL, 1),
    }


def detection(n: int, seed: int, lifeguard: bool) -> dict[str, Any]:
    net = SimNet(n, seed=seed, config=SwimConfig(lifeguard=lifeguard))
    net.run_until(5.0)
    victim = "n7"
    first: list[float] = []
    dead: set[str] = set()

    def seen(node: str, c: Change) -> None:
        if c.name != victim:
            return
        if not first:
            first.append(net.now)
        if c.new == DEAD:
            dead.add(node)

    net.on_change = seen
    t0 = net.now
    net.crash(victim)
    t = t0
    while len(dead) < n - 1 and t < t0 + 600:
        t += 0.5
        net.run_until(t)
    return {
        "n": n,
        "lifeguard": lifeguard,
        "first_suspicion_s": round(first[0] - t0, 2) if first else None,
        "dead_everywhere_s": round(t - t0, 1) if len(dead) == n - 1 else None,
    }


def accuracy(
    n: int,
    seed: int,
    lifeguard: bool,
    loss: float,
    seconds: float,
    stall: bool,
    model: str = "drop",
    stall_len: tuple[float, float] = (2.0, 5.0),
) -> dict[str, Any]:
    cfg = SwimConfig(lifeguard=lifeguard, **PUSH_PULL)
    setup = time.perf_counter()
    gc.disable()  # n x n long-lived member records: generational GC rescans them all, O(n^2)
    net = SimNet(n, seed=seed, config=cfg, loss=loss, stall_drop=model.endswith("drop"))
    gc.enable()
    gc.freeze()  # and keep them out of every later collection (the run's garbage is short-lived)
    setup = time.perf_counter() - setup
    freeze = net.slow if model.startswith("slow") else net.stall
    rng = random.Random(seed + 17)
    stallers = rng.sample(net.names, n // 10) if stall else []
    staller_set = set(stallers)
    killed = {"stalled": 0, "healthy": 0, "by_stalled": 0}

    def declared(node: str, c: Change) -> None:
        if c.new == DEAD and c.by == node:  # this member's own suspicion timeout fired
            killed["stalled" if c.name in staller_set else "healthy"] += 1
            killed["by_stalled"] += node in staller_set

    net.on_change = declared
    next_stall = {s: rng.uniform(0, 15) for s in stallers}
    step = 0.25
    t = 0.0
    wall = time.perf_counter()
    cpu = time.process_time()
    while t < seconds:
        t += step
        for s, when in next_stall.items():
            if when <= t:
                d = rng.uniform(*stall_len)
                freeze(s, d)
                next_stall[s] = t + d + rng.uniform(5, 15)
        net.run_until(t)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    stats = [node.stats for node in net.nodes.values()]
    per_hour = 3600.0 / seconds
    dead_views = sum(1 for a in net.nodes.values() for m in a.members.values() if m.state == DEAD)
    row = {
        "n": n,
        "lifeguard": lifeguard,
        "loss": loss,
        "stall": f"{model} {stall_len[0]:g}-{stall_len[1]:g} s" if stall else False,
        "seconds": seconds,
        "false_dead_per_h": round(sum(s["deaths"] for s in stats) * per_hour, 1),
        "false_dead_of_stalled_per_h": round(killed["stalled"] * per_hour, 1),
        "false_dead_of_never_stalled_per_h": round(killed["healthy"] * per_hour, 1),
        "false_dead_declared_by_stalled_per_h": round(killed["by_stalled"] * per_hour, 1),
        "stall_dropped": net.stall_dropped,
        "accusations_per_h": round(sum(s["accusations"] for s in stats) * per_hour, 1),
        "refutations_per_h": round(sum(s["refutations"] for s in stats) * per_hour, 1),
        "dead_views_at_end": dead_views,
        "bytes_per_node_s": round(net.bytes_sent / n / seconds, 1),
        "msgs_per_node_s": round(net.messages / n / seconds, 2),
        "wall_s": round(wall, 1),
        "setup_s": round(setup, 1),
        "cpu_s": round(cpu, 1),
    }
    print("  run:", json.dumps(row), flush=True)  # long runs: each row as soon as it is known
    return row


def _table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> None:
    print(f"\n{title}")
    print("  ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print("  ".join(f"{r.get(c)!s:>16}" for c in cols))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--big", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=3600.0, help="virtual s per accuracy run")
    ap.add_argument("--scale-seconds", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default="dissem,detect,accuracy,scale")
    ap.add_argument("--stall-model", choices=("drop", "queue", "slow", "slow-drop"), default="drop")
    ap.add_argument("--stall-len", default="2,5", help="accuracy: stall length LO,HI (s)")
    ap.add_argument("--no-stall", action="store_true", help="accuracy: only the loss cases")
    ap.add_argument("--modes", default="lifeguard,plain", help="lifeguard, plain or both")
    ap.add_argument("--loss", default="", help="accuracy: only these losses (0.01,0.05)")
    ap.add_argument("--stall-only", action="store_true", help="accuracy: only the stall cases")
    ap.add_argument(
        "--push-pull",
        default="",
        help="accuracy, scale: push-pull base interval S (0: off), ',fixed' not scaled with n",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if args.push_pull:
        base, _, fixed = args.push_pull.partition(",")
        PUSH_PULL.update(push_pull_interval=float(base), push_pull_scale=fixed != "fixed")
    out: dict[str, Any] = {"load": os.getloadavg()[0], "seed": args.seed}
    modes = tuple(m == "lifeguard" for m in args.modes.split(","))
    lo, hi = (float(x) for x in args.stall_len.split(","))
    if "dissem" in only:
        rows = [
            dissemination(n, args.seed, lg, loss)
            for n in (args.n, args.big)
            for loss in (0.0, 0.05)
            for lg in modes
        ]
        cols = ["n", "loss", "lifeguard", "rounds_999", "rounds_100", "s_999", "s_100"]
        _table("dissemination (round = 0.2 s gossip interval)", rows, cols)
        out["dissemination"] = rows
    if "detect" in only:
        rows = [detection(args.n, args.seed, lg) for lg in modes]
        _table(
            "crash detection", rows, ["n", "lifeguard", "first_suspicion_s", "dead_everywhere_s"]
        )
        out["detection"] = rows
    if "accuracy" in only:
        cases = [(0.01, False), (0.05, False), (0.10, False), (0.01, True), (0.05, True)]
        if args.loss:
            losses = {float(x) for x in args.loss.split(",")}
            cases = [c for c in cases if c[0] in losses]
        if args.stall_only:
            cases = [c for c in cases if c[1]]
        if args.no_stall:
            cases = [c for c in cases if not c[1]]
        rows = [
            accuracy(args.n, args.seed, lg, loss, args.seconds, stall, args.stall_model, (lo, hi))
            for loss, stall in cases
            for lg in modes
        ]
        cols = ["loss", "stall", "lifeguard", "false_dead_per_h",
                "false_dead_of_never_stalled_per_h", "accusations_per_h",
                "refutations_per_h", "bytes_per_node_s", "wall_s"]  # fmt: skip
        _table(f"accuracy, n = {args.n}, {args.seconds:g} virtual s per run", rows, cols)
        out["accuracy"] = rows
    if "scale" in only:
        r = accuracy(args.big, args.seed, True, 0.01, args.scale_seconds, False)
        _table(
            "scale (Lifeguard, 1% loss)",
            [r],
            ["n", "seconds", "setup_s", "wall_s", "cpu_s", "bytes_per_node_s"],
        )
        out["scale"] = r
    out["load_end"] = os.getloadavg()[0]
    out["cpu_s_total"] = round(time.process_time(), 1)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
