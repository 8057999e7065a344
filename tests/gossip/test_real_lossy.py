"""Eight real ``dwcp-node`` daemons gossiping through the link emulator with loss (ASS,
issue 13): each in its own namespace behind a ``Star`` spoke, every datagram crossing two
links with 2% loss and 5 ms each way. They still find each other, a killed node is dead
everywhere within the suspicion bound and alive again after its restart, and an image
stored at one node appears in ``where`` at every node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from node.cluster import NodeProc, wait_until

from dwcp.gossip.health import suspicion_min
from dwcp.netemu import unavailable_reason
from dwcp.netemu.params import Direction
from dwcp.netemu.star import Star, src_addr
from dwcp.node import control
from dwcp.node.config import load_config

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(bool(unavailable_reason()), reason=str(unavailable_reason())),
]

PERIOD = 0.5
N = 8
PORT = 7946  # the same port in every namespace


class SpokeNode(NodeProc):
    """A node whose daemon runs in spoke ``side`` of ``star`` (the control socket is a path,
    so the test reaches it from the host namespace)."""

    def __init__(self, root: Path, name: str, star: Star, i: int) -> None:
        super().__init__(root, name)
        self.star, self.side, self.host = star, f"src{i}", src_addr(i)

    def command(self, argv: list[str]) -> list[str]:
        return self.star.cmd(self.side, argv)


def members(n: NodeProc) -> dict[str, Any]:
    return dict(control.call(load_config(n.config).control_path, "members", timeout=10))


def test_eight_nodes_through_lossy_links(tmp_path: Path) -> None:
    with Star([Direction(100e6, 5, 0.02)] * N, seed=7) as star:
        star.route_sources()
        nodes = [SpokeNode(tmp_path, f"g{i}", star, i) for i in range(N)]
        table = "".join(
            f'\n[[members]]\nname = "{n.name}"\nkey = "{n.pubkey}"\naddress = "{n.host}:{PORT}"\n'
            for n in nodes
        )
        for n in nodes:
            text = f'listen = "{n.host}:{PORT}"\nperiod = {PERIOD}\n' + table
            (n.dir / "gossip.toml").write_text(text)
        try:
            for n in nodes:
                n.start()

            def all_alive() -> bool:
                for n in nodes:
                    rows = [r for r in members(n)["members"] if not r["self"]]
                    if len(rows) != N - 1:
                        return False
                    if any(r["state"] != "alive" or r["heard_s"] is None for r in rows):
                        return False
                return True

            wait_until(all_alive, "every member heard from and alive at every node", polls=600)
            victim = nodes[3]
            victim.kill()
            bound = suspicion_min(4, N, PERIOD) * 6 + N * PERIOD + 5

            def dead_everywhere() -> bool:
                for n in nodes:
                    if n is victim:
                        continue
                    st = {r["name"]: r["state"] for r in members(n)["members"]}
                    if st[victim.name] != "dead":
                        return False
                return True

            wait_until(
                dead_everywhere,
                f"{victim.name} dead everywhere within {bound:.0f} s",
                polls=int(bound / 0.1),
                interval=0.1,
            )
            victim.start()
            wait_until(all_alive, f"{victim.name} alive again everywhere", polls=600)
            src = nodes[5]
            src.images.mkdir(parents=True, exist_ok=True)
            (src.images / "lossy.img").write_bytes(b"\1" * (1 << 20))

            def where_everywhere() -> bool:
                for n in nodes:
                    got = control.call(
                        load_config(n.config).control_path, "where", {"image": "lossy.img"}
                    )
                    if [h["member"] for h in got["holders"]] != [src.name]:
                        return False
                return True

            wait_until(where_everywhere, "the image in 'where' at every node", 100, 0.1)
            assert sum(d.lost for st in star.stats() for d in (st.ab, st.ba)) > 0
        finally:
            for n in nodes:
                if n.proc is not None:
                    n.stop()
