"""The emulated star: each source reaches the destination over its own link, and only it."""

from __future__ import annotations

import sys

import pytest
from node.udp import ASK, ECHO

from dwcp.netemu import unavailable_reason
from dwcp.netemu.params import Direction
from dwcp.netemu.star import Star, dst_addr, src_addr

pytestmark = pytest.mark.skipif(bool(unavailable_reason()), reason=str(unavailable_reason()))


def test_each_source_answers_over_its_link_and_teardown_is_complete() -> None:
    from dwcp.netemu import netns

    links = [Direction(10e6, 5, 0.0), Direction(20e6, 5, 0.0)]
    with Star(links) as star:
        names = set(star.namespaces)
        for i, side in enumerate(star.sources):
            star.popen(side, [sys.executable, "-c", ECHO, src_addr(i)])
        for i in range(len(links)):
            r = star.run_in("dst", [sys.executable, "-c", ASK, src_addr(i)], capture_output=True)
            assert r.stdout.decode().strip() == f"hi from {dst_addr(i)}", r.stderr
        assert dst_addr(0) != dst_addr(1)
        star.set_rate(1, 2e6)
        assert len(star.stats()) == 2
    assert not names & set(netns.list_ns())
