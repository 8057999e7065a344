"""The ASS membership core: codec, Lifeguard formulas, and behaviour in the simulator."""

from __future__ import annotations

import contextlib
import math
import random

import pytest

from dwcp.errors import ProtocolError
from dwcp.gossip import ALIVE, DEAD, LEFT, SUSPECT, Swim, SwimConfig
from dwcp.gossip.health import Awareness, retransmit_limit, suspicion_min, suspicion_timeout
from dwcp.gossip.messages import ACK, GOSSIP, PING, PING_REQ, Message, decode, encode
from dwcp.gossip.sim import SimNet


def test_codec_round_trip_and_exact_size() -> None:
    m = Message(PING_REQ, 2**40, "node-7", [(SUSPECT, "n1", 5, "n2"), (ALIVE, "a" * 64, 1, "b")])
    raw = encode(m)
    assert decode(raw) == m
    assert len(raw) == m.size()
    assert len(encode(Message(ACK, 1, "", []))) == Message(ACK, 1, "", []).size()


@pytest.mark.parametrize("cut", range(0, 40))
def test_codec_rejects_truncated_and_garbage(cut: int) -> None:
    raw = encode(Message(GOSSIP, 9, "t", [(DEAD, "n1", 3, "n2")]))
    if cut < len(raw):
        with pytest.raises(ProtocolError):
            decode(raw[:cut])
    rng = random.Random(cut)
    junk = bytes(rng.randrange(256) for _ in range(cut))
    with contextlib.suppress(ProtocolError):
        decode(junk)  # anything but ProtocolError is a bug


def test_codec_refuses_long_or_non_ascii_names() -> None:
    with pytest.raises(ProtocolError):
        encode(Message(PING, 1, "x" * 65, []))
    with pytest.raises(ProtocolError):
        encode(Message(PING, 1, "é", []))


def test_memberlist_formulas() -> None:
    # n = 1000, LAN: suspicion 12..72 s, 16 retransmits (research note, derived)
    lo = suspicion_min(4, 1000, 1.0)
    assert lo == pytest.approx(12.0)
    assert retransmit_limit(4, 1000) == 16
    assert suspicion_timeout(0, 2, lo, 6 * lo) == pytest.approx(72.0)
    assert suspicion_timeout(1, 2, lo, 6 * lo) == pytest.approx(72 - 60 * math.log(2) / math.log(3))
    assert suspicion_timeout(2, 2, lo, 6 * lo) == pytest.approx(12.0)
    assert suspicion_timeout(5, 0, lo, 6 * lo) == pytest.approx(12.0)


def test_awareness_is_bounded_and_scales() -> None:
    a = Awareness(8)
    a.apply(-3)
    assert a.score == 0
    a.apply(20)
    assert a.score == 7 and a.scale(1.0) == 8.0


def _views(net: SimNet, about: str) -> set[int]:
    return {net.nodes[n].state_of(about) for n in net.alive_nodes() if n != about}


def test_quiet_cluster_stays_alive() -> None:
    net = SimNet(30, seed=1)
    net.run_until(120)
    assert all(_views(net, n) == {ALIVE} for n in net.names)
    assert sum(node.stats["suspicions"] for node in net.nodes.values()) == 0


@pytest.mark.parametrize("lifeguard", [True, False])
def test_crash_is_dead_everywhere_within_the_suspicion_bound(lifeguard: bool) -> None:
    cfg = SwimConfig(lifeguard=lifeguard)
    net = SimNet(40, seed=2, config=cfg)
    net.run_until(10)
    net.crash("n5")
    lo = suspicion_min(4, 40, 1.0)
    hi = lo * (6 if lifeguard else 1)
    # detection takes at most a round-robin pass (n periods) plus the suspicion timeout
    deadline = 10 + 40 * 1.0 + hi + 5
    t = 10.0
    while _views(net, "n5") != {DEAD} and t < deadline:
        t += 1
        net.run_until(t)
    assert _views(net, "n5") == {DEAD}, f"not dead everywhere by {t} s"
    net.restart("n5")
    net.run_until(t + 10)
    assert _views(net, "n5") == {ALIVE}


def test_restart_without_persisted_incarnation_comes_back() -> None:
    # memberlist #311: a member that restarts with an old incarnation must not stay dead
    net = SimNet(20, seed=3)
    net.run_until(5)
    net.crash("n3")
    net.run_until(120)
    assert _views(net, "n3") == {DEAD}
    net.restart("n3", persisted=False)
    net.run_until(150)
    assert _views(net, "n3") == {ALIVE}


def test_suspect_refutes_with_a_higher_incarnation() -> None:
    node = Swim("a", ["a", "b", "c"], now=0.0, incarnation=4, rng=random.Random(1))
    node.receive("b", Message(GOSSIP, 0, "", [(SUSPECT, "a", 4, "b")]), 1.0)
    assert node.incarnation == 5
    assert node.stats["refutations"] == 1
    assert node.queue.pending("a") == (ALIVE, "a", 5, "a")
    assert node.awareness.score == 1
    node.receive("b", Message(GOSSIP, 0, "", [(SUSPECT, "a", 3, "b")]), 2.0)
    assert node.incarnation == 5  # an old accusation is ignored


def test_non_member_and_updates_about_non_members_are_dropped() -> None:
    node = Swim("a", ["a", "b"], now=0.0, rng=random.Random(1))
    assert node.receive("mallory", Message(PING, 1, "a", [(DEAD, "b", 9, "m")]), 1.0) == []
    assert node.state_of("b") == ALIVE
    node.receive("b", Message(GOSSIP, 0, "", [(ALIVE, "mallory", 9, "b")]), 1.0)
    assert "mallory" not in node.members
    assert node.stats["dropped"] == 2


def test_ping_gets_ack_and_a_suspect_gets_its_accusation_first() -> None:
    node = Swim("a", ["a", "b", "c"], now=0.0, rng=random.Random(1))
    node.receive("c", Message(GOSSIP, 0, "", [(SUSPECT, "b", 1, "c")]), 0.5)
    out = node.receive("b", Message(PING, 7, "a", []), 1.0)
    assert [(d, m.kind, m.seq) for d, m in out] == [("b", ACK, 7)]
    assert out[0][1].updates[0] == (SUSPECT, "b", 1, "a")


def test_indirect_probe_relays_ack_and_nacks() -> None:
    node = Swim("a", ["a", "b", "c"], now=0.0, rng=random.Random(1))
    node.tick(0.0)
    (dst, ping), *_ = node.receive("b", Message(PING_REQ, 3, "c", []), 1.0)
    assert (dst, ping.kind, ping.target) == ("c", PING, "c")
    out = node.receive("c", Message(ACK, ping.seq, "", []), 1.01)
    assert [(d, m.kind, m.seq) for d, m in out] == [("b", ACK, 3)]
    # with no ack, a nack goes back before the requester's period ends
    node.receive("b", Message(PING_REQ, 4, "c", []), 2.0)
    sent = node.tick(2.9)
    assert ("b", 4) in [(d, m.seq) for d, m in sent if m.kind == 4]


def test_leave_marks_left_not_dead() -> None:
    net = SimNet(10, seed=4)
    net.run_until(5)
    sends = net.nodes["n2"].leave(net.now)
    net.inject("n2", sends)
    net.run_until(8)
    net.crash("n2")
    net.run_until(60)
    assert _views(net, "n2") == {LEFT}


def test_partition_heals() -> None:
    net = SimNet(20, seed=5)
    left = set(net.names[:10])
    net.blocked = lambda s, d: (s in left) != (d in left)
    net.run_until(200)
    assert DEAD in _views(net, "n15")
    net.blocked = None
    net.run_until(300)
    assert all(_views(net, n) == {ALIVE} for n in net.names)


@pytest.mark.parametrize("lifeguard", [True, False])
def test_a_stalled_member_is_suspected_then_refutes(lifeguard: bool) -> None:
    net = SimNet(20, seed=6, config=SwimConfig(lifeguard=lifeguard))
    net.run_until(10)
    net.stall("n4", 4.0)
    net.run_until(60)
    assert all(_views(net, n) == {ALIVE} for n in net.names)
    assert sum(node.stats["suspicions"] for node in net.nodes.values()) > 0
    assert net.nodes["n4"].stats["refutations"] >= 1
    assert sum(node.stats["deaths"] for node in net.nodes.values()) == 0


def test_a_stall_that_drops_its_input_is_refuted_under_lifeguard() -> None:
    """Lifeguard's stall model: a frozen member loses what arrives meanwhile. With the buddy
    rule it learns of its suspicion from the next probe and refutes; nobody declares it dead."""
    net = SimNet(20, seed=6, config=SwimConfig(lifeguard=True), stall_drop=True)
    net.run_until(10)
    net.stall("n4", 4.0)
    net.run_until(60)
    assert net.stall_dropped > 0
    assert all(_views(net, n) == {ALIVE} for n in net.names)
    assert net.nodes["n4"].stats["refutations"] >= 1
    assert sum(node.stats["deaths"] for node in net.nodes.values()) == 0


@pytest.mark.parametrize("drop", [True, False])
def test_a_slow_receiver_keeps_probing_while_its_input_waits_or_is_lost(drop: bool) -> None:
    """``SimNet.slow``: the member's timers run (it probes) but no message is processed
    during the window; queued input is processed at its end, or lost with ``stall_drop``."""
    net = SimNet(20, seed=6, config=SwimConfig(lifeguard=True), stall_drop=drop)
    net.run_until(10)
    slow = net.nodes["n4"]
    probes, received = slow.stats["probes"], slow.stats["received"]
    net.slow("n4", 4.0)
    net.run_until(13.9)
    assert slow.stats["probes"] >= probes + 2
    assert slow.stats["received"] == received
    net.run_until(60)
    assert (net.stall_dropped > 0) == drop
    assert slow.stats["received"] > received
    assert all(_views(net, n) == {ALIVE} for n in net.names)


def _deaths_with_slow_receivers(lifeguard: bool) -> int:
    net = SimNet(20, seed=3, config=SwimConfig(lifeguard=lifeguard), stall_drop=True)
    rng = random.Random(3)
    slow = rng.sample(net.names, 2)
    nxt = {s: rng.uniform(0, 10) for s in slow}
    t = 0.0
    while t < 60:
        t += 0.25
        for s, when in nxt.items():
            if when <= t:
                d = rng.uniform(2, 5)
                net.slow(s, d)
                nxt[s] = t + d + rng.uniform(5, 15)
        net.run_until(t)
    return sum(node.stats["deaths"] for node in net.nodes.values())


def test_lifeguard_declares_far_fewer_slow_receivers_dead_than_plain_swim() -> None:
    """The Lifeguard paper's anomaly (slow message processing, input lost): plain SWIM's
    fixed timeout and lack of a buddy rule kill members whose refutation never came."""
    lifeguard, plain = _deaths_with_slow_receivers(True), _deaths_with_slow_receivers(False)
    assert plain > 10 * max(lifeguard, 1)


def test_a_member_deaf_for_longer_than_its_suspicions_declares_nobody_dead() -> None:
    """Issue 13's slow-member false deaths: n0's input is lost for 30 s while its timers run.
    It fails its probes, accuses members, they refute, n0 misses every refutation and its
    own suspicion timers (24 s with no confirmations at n = 10) expire while it is deaf.
    Before the fix it declared 4 healthy members dead; now, unwell since those suspicions
    began, it pings each suspect first and hears the refutation in the ack."""
    net = SimNet(10, seed=4, config=SwimConfig(lifeguard=True), stall_drop=True)
    net.run_until(10)
    deaf = net.nodes["n0"]
    net.slow("n0", 30.0)
    net.run_until(120)
    assert deaf.stats["deaths"] == 0
    assert deaf.stats["accusations"] >= 3
    assert deaf.stats["rechecks"] >= 3
    assert all(_views(net, n) == {ALIVE} for n in net.names)


def test_a_member_that_was_unwell_still_declares_a_crashed_member_dead() -> None:
    """The recheck delays this member's own declaration, it does not hide a real failure: a
    member crashes while n0 is deaf; the others declare it dead and n0 holds it dead too."""
    net = SimNet(10, seed=4, config=SwimConfig(lifeguard=True), stall_drop=True)
    net.run_until(10)
    deaf = net.nodes["n0"]
    net.slow("n0", 30.0)
    net.run_until(12)
    net.crash("n5")
    net.run_until(120)
    assert deaf.state_of("n5") == DEAD
    assert all(_views(net, n) == {ALIVE} for n in net.names if n not in ("n0", "n5"))
