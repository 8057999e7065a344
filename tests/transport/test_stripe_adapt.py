"""Sans-IO cores: reassembly order and bounds, the send window, the parallelism controller."""

from __future__ import annotations

import itertools
import random

import pytest

from dwcp.errors import FrameError, UsageError
from dwcp.pba.parallelism import Controller, Limits, LinkSample, create_policy, register_policy
from dwcp.transport.stripe import Reassembler, SendWindow


def test_shuffled_chunks_come_out_in_order() -> None:
    rng = random.Random(7)
    data = rng.randbytes(100_000)
    chunks = [(o, data[o : o + 777]) for o in range(1000, len(data), 777)]
    rng.shuffle(chunks)
    r = Reassembler(limit=len(data))
    out = []
    for i, (off, chunk) in enumerate(chunks):
        r.add(off, chunk)
        if i == len(chunks) // 2:
            r.set_start(1000)  # the start may be announced after data arrived
        for piece in r.pop():
            out.append(piece)
            r.release(len(piece))
    r.set_end(len(data))
    assert b"".join(out) == data[1000:]
    assert r.complete and r.buffered == 0 and r.consumed == len(data)


def test_reassembler_refuses_overrun_overlap_and_duplicates() -> None:
    r = Reassembler(limit=10)
    r.set_start(0)
    r.add(5, b"12345")
    with pytest.raises(FrameError, match="twice"):
        r.add(5, b"1")
    with pytest.raises(FrameError, match="overran"):
        r.add(20, b"123456")
    r.add(0, b"abcde")
    assert r.pop() == [b"abcde", b"12345"]
    with pytest.raises(FrameError, match="overlaps"):
        r.add(3, b"x")
    r.set_end(10)
    with pytest.raises(FrameError, match="past the end"):
        r.add(10, b"y")


def test_send_window_bounds_unacknowledged_bytes() -> None:
    w = SendWindow(start=100, window=10)
    assert w.take(6) == 100
    assert w.room() == 4
    with pytest.raises(UsageError):
        w.take(5)
    assert w.ack(103)
    assert w.room() == 7
    assert not w.ack(101)
    with pytest.raises(FrameError):
        w.ack(1000)


def _sample(t: float, gp: float, c: int, s: int, loss: float = 0.0) -> LinkSample:
    return LinkSample(
        now=t, interval=1, goodput_bps=gp, rtt_s=0.05, loss=loss, connections=c, streams=s
    )


def test_probe_climbs_while_goodput_grows_then_backs_off() -> None:
    ctl = Controller("probe", limits=Limits(max_connections=4, max_streams=8), initial=(1, 1))
    # Goodput still growing at the first level (a connection's startup): wait.
    d = ctl.feed(_sample(-1, 10.0, 1, 1))
    assert (d.connections, d.streams) == (1, 1) and "wait" in d.reason
    # Goodput grows with every step: the controller keeps probing upwards.
    gp = 10.0
    for t in range(4):
        d = ctl.feed(_sample(t, gp, ctl.connections, ctl.streams))
        gp *= 1.5
    assert (ctl.connections, ctl.streams) > (1, 1)
    best = (ctl.connections, ctl.streams)
    # The step after `best` gains nothing: back to best and hold.
    d = ctl.feed(_sample(10, gp, *best))
    probe = (d.connections, d.streams)
    assert probe != best
    d = ctl.feed(_sample(11, gp, *probe))
    assert (d.connections, d.streams) == best
    assert "hold" in d.reason
    snap = ctl.snapshot()
    assert snap.decision == d and snap.last_sample is not None and snap.policy == "probe"


def test_loss_adds_connections_first() -> None:
    ctl = Controller("probe", initial=(1, 2))
    ctl.feed(_sample(0, 1e6, 1, 2, loss=0.01))
    d = ctl.feed(_sample(1, 1e6, 1, 2, loss=0.01))
    assert (d.connections, d.streams) == (2, 2)


def test_failed_probes_hold_longer_each_time() -> None:
    """With a link one connection fills, extra connections are tried ever more rarely."""
    ctl = Controller("probe", limits=Limits(max_connections=4, max_streams=1), initial=(1, 1))
    probes_at = []
    for t in range(200):
        level = (ctl.connections, ctl.streams)
        if level != (1, 1):
            probes_at.append(t)
        ctl.feed(_sample(t, 100.0, *level))  # the same goodput whatever the level
    assert probes_at, "it still probes now and then"
    gaps = [b - a for a, b in itertools.pairwise(probes_at)]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]
    assert len(probes_at) < 10


def test_policies_are_pluggable_by_name() -> None:
    class Always3:
        def decide(self, sample: LinkSample, limits: Limits) -> object:
            from dwcp.pba.parallelism import Decision

            return Decision(3, 99, "test")

    register_policy("always3-test", Always3)  # type: ignore[arg-type]
    ctl = Controller("always3-test", limits=Limits(max_streams=4))
    d = ctl.feed(_sample(0, 1, 1, 1))
    assert (d.connections, d.streams) == (3, 4)  # clamped to the limits
    with pytest.raises(UsageError, match="unknown parallelism policy"):
        create_policy("nope")
