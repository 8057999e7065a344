"""The emulated star: each source reaches the destination over its own link, and only it."""

from __future__ import annotations

import sys

import pytest

from dwcp.netemu import unavailable_reason
from dwcp.netemu.params import Direction
from dwcp.netemu.star import Star, dst_addr, src_addr

pytestmark = pytest.mark.skipif(bool(unavailable_reason()), reason=str(unavailable_reason()))

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9999))
s.settimeout(20)
data, addr = s.recvfrom(100)
s.sendto(data + b"!", addr)
"""

ASK = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(30):
    s.sendto(b"hi", (sys.argv[1], 9999))
    try:
        print(s.recvfrom(100)[0].decode()); break
    except TimeoutError:
        continue
"""


def test_each_source_answers_over_its_link_and_teardown_is_complete() -> None:
    from dwcp.netemu import netns

    links = [Direction(10e6, 5, 0.0), Direction(20e6, 5, 0.0)]
    with Star(links) as star:
        names = set(star.namespaces)
        for i, side in enumerate(star.sources):
            star.popen(side, [sys.executable, "-c", ECHO, src_addr(i)])
        for i in range(len(links)):
            r = star.run_in("dst", [sys.executable, "-c", ASK, src_addr(i)], capture_output=True)
            assert r.stdout.strip() == b"hi!", r.stderr
        assert dst_addr(0) != dst_addr(1)
        star.set_rate(1, 2e6)
        assert len(star.stats()) == 2
    assert not names & set(netns.list_ns())
