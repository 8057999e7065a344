"""A WAN link emulator for tests and benchmarks: rate, drop-tail queue, delay, loss.

    with Link(rate_bps=100e6, delay_ms=25, loss=0.005, seed=1) as link:
        server = link.popen_b(["iperf3", "-s", "-1"])
        link.run_in_a(["iperf3", "-c", link.addr_b])
        print(link.stats())

Needs root, network namespaces and TUN (or netem); ``unavailable_reason()``
says why not, for tests to skip.
"""

from __future__ import annotations

from dwcp.netemu.link import ADDR_A, ADDR_B, Link
from dwcp.netemu.netns import has_netem, unavailable_reason
from dwcp.netemu.params import Direction, direction_seed
from dwcp.netemu.shaper import Decision, Shaper, Verdict
from dwcp.netemu.stats import DirectionStats, LinkStats

__all__ = [
    "ADDR_A",
    "ADDR_B",
    "Decision",
    "Direction",
    "DirectionStats",
    "Link",
    "LinkStats",
    "Shaper",
    "Verdict",
    "direction_seed",
    "has_netem",
    "unavailable_reason",
]
