"""ASS on real daemons: 8 ``dwcp-node`` processes on loopback gossiping over signed UDP.

Measures (probe period ``--period``, default 1 s, memberlist's LAN timing scaled to it):
- seconds from the last node's start until every node has heard every other and holds it
  alive;
- seconds from SIGKILL of one node until every other holds it dead (the bound is the
  Lifeguard suspicion maximum, 6 x 4 x max(1, log10 n) periods, plus a probe cycle);
- seconds from its restart until it is alive everywhere again;
- seconds from an image written into one node's image directory until ``where`` at every
  node names it (target <= 5 s);
- gossip bytes sent per node per second over a quiet window (signed datagrams);
- a ninth daemon that is not admitted (its own gossip.toml lists the fleet, the fleet's
  does not list it), run for ``--stranger`` seconds at the end: bytes it received, members
  it heard from, whether ``where`` there names the image, datagrams the fleet dropped as
  not admitted, and whether any member lists it.
Without ``--loss`` the daemons share loopback (no loss). With ``--loss P`` each daemon
(the stranger too) runs in its own namespace behind a spoke of a ``dwcp.netemu.Star`` whose
hub forwards spoke to spoke, so every gossip datagram crosses two emulated links, each
with loss P and ``--delay-ms`` one way (root only; ``EmulatorError`` says why not).

    python benchmarks/gossip_real_bench.py [--period 1.0] [--quiet 20] [--loss 0.01] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dwcp.gossip.health import suspicion_min
from dwcp.netemu.params import Direction
from dwcp.netemu.star import Star, src_addr
from dwcp.node import control
from dwcp.node.config import load_config

N = 8
PY = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One daemon; on a star (``star``/``side`` set) it runs in that spoke's namespace."""

    star: Star | None = None
    side = ""
    host = "127.0.0.1"

    def __init__(self, root: Path, name: str) -> None:
        self.name, self.dir = name, root / name
        out = subprocess.run(
            [PY, "-m", "dwcp.cli", "init", str(self.dir), "--listen", f"127.0.0.1:{free_port()}",
             "--name", name],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        self.pubkey = out.stdout.strip().splitlines()[-1]
        self.config = self.dir / "node.toml"
        self.sock = load_config(self.config).control_path
        self.gossip_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.dir / "node.log", "ab")  # noqa: SIM115 - the child keeps it
        argv = [PY, "-m", "dwcp.node", "--config", str(self.config)]
        if self.star is not None:  # `ip netns exec` execs the daemon: the pid is the daemon's
            argv = self.star.cmd(self.side, argv)
        self.proc = subprocess.Popen(argv, stderr=log, stdout=log)
        for _ in range(600):
            try:
                control.call(self.sock, "status", timeout=5)
                return
            except (control.NodeNotRunningError, OSError):
                time.sleep(0.05)
        raise SystemExit(f"node {self.name} did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
            self.proc = None

    def members(self) -> dict[str, Any]:
        return dict(control.call(self.sock, "members", timeout=10))


def wait(pred: Any, limit: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if pred():
            return round(time.monotonic() - t0, 2)
        time.sleep(0.05)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--period", type=float, default=1.0)
    ap.add_argument("--quiet", type=float, default=20.0, help="seconds of the bytes/s window")
    ap.add_argument("--stranger", type=float, default=10.0, help="seconds the stranger runs")
    ap.add_argument("--loss", type=float, default=None, help="per-link loss on the star")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="per-link one-way delay")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args()
    out: dict[str, Any] = {"n": N, "period": args.period, "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="gossip-bench-") as tmp, contextlib.ExitStack() as es:
        nodes = [Node(Path(tmp), f"g{i}") for i in range(N)]
        stranger = Node(Path(tmp), "mallory")
        if args.loss is not None:
            link = Direction(rate_bps=100e6, delay_ms=args.delay_ms, loss=args.loss)
            star = es.enter_context(Star([link] * (N + 1), seed=13))
            star.route_sources()
            for i, n in enumerate([*nodes, stranger]):
                n.star, n.side, n.host = star, f"src{i}", src_addr(i)
            out.update(loss_per_link=args.loss, delay_ms_per_link=args.delay_ms)
            out["path"] = "two links per datagram (spoke, hub, spoke)"

        def table(ns: list[Node]) -> str:
            return "".join(
                f'\n[[members]]\nname = "{n.name}"\nkey = "{n.pubkey}"\n'
                f'address = "{n.host}:{n.gossip_port}"\n'
                for n in ns
            )

        for n in [*nodes, stranger]:
            (n.dir / "gossip.toml").write_text(
                f'listen = "{n.host}:{n.gossip_port}"\nperiod = {args.period}\n'
                + table(nodes if n is not stranger else [*nodes, stranger])
            )
        try:
            for n in nodes:
                n.start()

            def states(n: Node) -> dict[str, tuple[str, Any]]:
                return {r["name"]: (r["state"], r["heard_s"]) for r in n.members()["members"]}

            def all_alive(skip: str = "") -> bool:
                for n in nodes:
                    st = states(n)
                    if any(s != "alive" or h is None for s, h in st.values()):
                        return False
                return True

            out["all_alive_s"] = wait(all_alive, 120)
            before = {n.name: n.members()["bytes_sent"] for n in nodes}
            time.sleep(args.quiet)
            after = {n.name: n.members()["bytes_sent"] for n in nodes}
            rates = [(after[k] - before[k]) / args.quiet for k in before]
            out["bytes_per_node_s"] = round(sum(rates) / len(rates), 1)
            victim = nodes[3]
            victim.stop(signal.SIGKILL)
            bound = suspicion_min(4, N, args.period) * 6 + N * args.period
            out["dead_bound_s"] = round(bound, 1)
            out["dead_everywhere_s"] = wait(
                lambda: all(states(n)[victim.name][0] == "dead" for n in nodes if n is not victim),
                bound + 30,
            )
            victim.start()
            out["alive_again_s"] = wait(all_alive, 120)
            (nodes[5].dir / "data" / "images").mkdir(parents=True, exist_ok=True)
            img = load_config(nodes[5].config).data_dir / "images" / "bench.img"
            img.write_bytes(os.urandom(4 << 20))
            out["where_everywhere_s"] = wait(
                lambda: all(
                    any(
                        h["member"] == nodes[5].name
                        for h in control.call(n.sock, "where", {"image": "bench.img"})["holders"]
                    )
                    for n in nodes
                ),
                60,
            )
            dropped0 = sum(n.members()["dropped"]["not_admitted"] for n in nodes)
            stranger.start()
            time.sleep(args.stranger)
            sm = stranger.members()
            out["stranger_bytes_received"] = sm["bytes_received"]
            out["stranger_bytes_sent"] = sm["bytes_sent"]
            out["stranger_heard_from"] = sum(
                1 for r in sm["members"] if not r["self"] and r["heard_s"] is not None
            )
            out["stranger_where_holders"] = len(
                control.call(stranger.sock, "where", {"image": "bench.img"})["holders"]
            )
            out["fleet_dropped_not_admitted"] = (
                sum(n.members()["dropped"]["not_admitted"] for n in nodes) - dropped0
            )
            out["stranger_listed_by"] = sum(
                1 for n in nodes if any(r["name"] == stranger.name for r in n.members()["members"])
            )
        finally:
            for n in [*nodes, stranger]:
                n.stop()
            if args.loss is not None:
                dirs = [d for st in star.stats() for d in (st.ab, st.ba)]
                out["link_packets"] = sum(d.rx_packets for d in dirs)
                out["link_lost"] = sum(d.lost for d in dirs)
                out["link_queue_drops"] = sum(d.queue_drops + d.overflow_drops for d in dirs)
    out["load_end"] = os.getloadavg()[0]
    for k, v in out.items():
        print(f"{k:>20}  {v}")
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
