"""Trace-driven links: the rate changes while the link runs (issue 14)."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest

from dwcp.netemu import Direction, Link, Shaper, Verdict, unavailable_reason
from dwcp.netemu.trace import TraceReplay
from dwcp.pba.traces import Step


def _reference(arrivals: list[tuple[int, int, float | None]], d: Direction) -> list[int | None]:
    """Pure-Python drop-tail + rate + delay with rate changes (no loss), for equality."""
    busy, rate, out = 0.0, d.rate_bps, []
    for now, length, new_rate in arrivals:
        if new_rate is not None:
            rate = new_rate
        backlog = (busy - now) * rate / 8e9 if busy > now else 0.0
        if backlog + length > d.queue_limit:
            out.append(None)
            continue
        busy = max(busy, float(now)) + length * 8e9 / rate
        out.append(int(busy + 0.5) + int(d.delay_ms * 1e6))
    return out


def test_rate_changes_match_the_python_reference() -> None:
    rng = random.Random(5)
    d = Direction(rate_bps=20e6, delay_ms=10)
    now, arrivals = 0, []
    for i in range(5000):
        now += rng.randint(0, 400_000)
        change = rng.choice([5e6, 20e6, 60e6]) if i % 500 == 250 else None
        arrivals.append((now, rng.choice([80, 1500]), change))
    s = Shaper(d, seed=1)
    got: list[int | None] = []
    for t, length, change in arrivals:
        if change is not None:
            s.set_rate(change)
        r = s.admit(t, length)
        got.append(r.deliver_ns if r.verdict == Verdict.PASS else None)
    assert got == _reference(arrivals, d)
    assert None in got  # the queue filled at least once at the low rate


def _iperf(link: Link, seconds: int) -> float:
    out = link.run_in_a(
        ["iperf3", "-c", link.addr_b, "-t", str(seconds), "-J"], capture_output=True, text=True
    )
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"])


@pytest.mark.netns
@pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_a_replayed_trace_sets_the_goodput() -> None:
    with Link(rate_bps=40e6, delay_ms=5, backend="tun") as link:
        server = link.popen_b(["iperf3", "-s"])
        time.sleep(0.3)
        with TraceReplay(link, [Step(0, 8e6), Step(60, 40e6)]) as replay:
            slow = _iperf(link, 3)
        assert replay.applied == 1  # the block ended before the second step
        link.set_rate(40e6)
        fast = _iperf(link, 3)
        server.terminate()
    assert slow < 9e6 and fast > 25e6
