"""The star as a fleet's network (issue 13, ``gossip_real_bench.py --loss``): with
``route_sources`` a datagram from one spoke reaches another through the hub, over both
links, so gossip between any two members meets two links' delay and loss."""

from __future__ import annotations

import sys

import pytest
from node.udp import ASK, ECHO

from dwcp.netemu import unavailable_reason
from dwcp.netemu.params import Direction
from dwcp.netemu.star import Star, src_addr

pytestmark = pytest.mark.skipif(bool(unavailable_reason()), reason=str(unavailable_reason()))


def test_a_spoke_reaches_another_spoke_through_the_hub_over_both_links() -> None:
    with Star([Direction(10e6, 2, 0.0)] * 3) as star:
        star.route_sources()
        star.popen("src2", [sys.executable, "-c", ECHO, src_addr(2)])
        r = star.run_in("src0", [sys.executable, "-c", ASK, src_addr(2)], capture_output=True)
        assert r.stdout.decode().strip() == f"hi from {src_addr(0)}", r.stderr
        links = star.stats()
    # the request crossed link 0 towards the hub and link 2 away from it; link 1 carried nothing
    assert links[0].ab.tx_packets >= 1 and links[2].ba.tx_packets >= 1
    assert links[1].ab.rx_packets == 0 and links[1].ba.rx_packets == 0
