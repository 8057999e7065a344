"""Anti-entropy of member state (push-pull): merge rules, refutation, bounds, the simulator."""

from __future__ import annotations

import random

import pytest

from dwcp.errors import ProtocolError
from dwcp.gossip import ALIVE, DEAD, SUSPECT, Swim, SwimConfig, pushpull
from dwcp.gossip.messages import GOSSIP, PULL, PUSH, Message, Update, decode, encode
from dwcp.gossip.sim import SimNet


def _node(name: str = "a") -> Swim:
    return Swim(name, ["a", "b", "c", "d"], now=0.0, rng=random.Random(1))


def _push(rows: list[Update], exchange: int = 1) -> Message:
    return Message(PUSH, pushpull.seq_of(exchange, 0, 1), "", rows)


def test_newer_incarnation_wins_and_older_is_ignored() -> None:
    a = _node()
    a.receive("b", _push([(ALIVE, "c", 5, "b")]), 1.0)
    assert (a.members["c"].state, a.members["c"].inc) == (ALIVE, 5)
    a.receive("d", _push([(DEAD, "c", 4, "d")], 2), 2.0)
    assert (a.members["c"].state, a.members["c"].inc) == (ALIVE, 5)


def test_dead_beats_alive_at_equal_incarnation() -> None:
    a = _node()
    a.receive("b", _push([(ALIVE, "c", 3, "b")]), 1.0)
    a.receive("d", _push([(DEAD, "c", 3, "d")], 2), 2.0)
    assert a.members["c"].state == DEAD
    a.receive("b", _push([(ALIVE, "c", 3, "b")], 3), 3.0)
    assert a.members["c"].state == DEAD  # equal incarnation: alive does not undo dead
    a.receive("b", _push([(ALIVE, "c", 4, "b")], 4), 4.0)
    assert a.members["c"].state == ALIVE


@pytest.mark.parametrize("state", [SUSPECT, DEAD])
def test_a_member_suspected_or_dead_in_the_peers_view_refutes(state: int) -> None:
    a = _node()
    inc = a.incarnation
    a.receive("b", _push([(state, "a", inc, "b")]), 1.0)
    assert a.incarnation == inc + 1
    assert a.stats["refutations"] == 1
    assert a.queue.pending("a") == (ALIVE, "a", inc + 1, "a")


def test_a_stale_suspicion_is_repaired_before_it_kills() -> None:
    a = _node()
    a.receive("b", Message(GOSSIP, 0, "", [(SUSPECT, "c", 1, "b")]), 1.0)
    assert a.members["c"].state == SUSPECT
    b = _node("b")
    b.receive("c", Message(GOSSIP, 0, "", [(ALIVE, "c", 2, "c")]), 1.0)
    for msg in pushpull.chunks(PUSH, 7, b.table(), 8192):
        a.receive("b", msg, 2.0)
    assert (a.members["c"].state, a.members["c"].inc) == (ALIVE, 2)
    a.tick(500.0)
    assert a.stats["deaths"] == 0


def test_a_push_gets_one_pull_back_and_replays_are_rate_limited() -> None:
    a = _node()
    out = a.receive("b", _push([(ALIVE, "b", 2, "b")]), 1.0)
    pulls = [m for dst, m in out if dst == "b" and m.kind == PULL]
    assert len(pulls) == 1 and pulls[0].updates[0] == (ALIVE, "a", a.incarnation, "a")
    assert a.receive("b", _push([(ALIVE, "b", 2, "b")], 2), 1.5) == []
    assert a.receive("c", Message(PULL, pushpull.seq_of(3, 0, 1), "", []), 1.6) == []


def test_large_tables_travel_in_bounded_chunks() -> None:
    table: list[Update] = [(ALIVE, f"member-{i:05d}", i, "me") for i in range(3000)]
    msgs = pushpull.chunks(PUSH, 9, table, 4096)
    assert [u for m in msgs for u in m.updates] == table
    for i, m in enumerate(msgs):
        raw = encode(m)
        assert len(raw) <= 4096 + 32 and len(m.updates) <= 255
        assert decode(raw) == m
        assert pushpull.chunk_fields(m.seq) == (9, i, len(msgs))
    with pytest.raises(ProtocolError):
        pushpull.chunks(PUSH, 1, table * 30, 512)


@pytest.mark.parametrize(
    "msg",
    [
        Message(PUSH, pushpull.seq_of(1, 0, 1), "", [(DEAD, "c", 9, "b"), (ALIVE, "c", 9, "b")]),
        Message(PUSH, pushpull.seq_of(1, 3, 2), "", [(DEAD, "c", 9, "b")]),
        Message(PUSH, pushpull.seq_of(1, 0, 0), "", [(DEAD, "c", 9, "b")]),
        Message(PUSH, pushpull.seq_of(1, 0, 1), "", [(DEAD, f"x{i}", 9, "b") for i in range(6)]),
    ],
    ids=["duplicate-name", "index-past-count", "zero-chunks", "more-entries-than-members"],
)
def test_hostile_chunks_are_rejected_whole_with_a_reason(msg: Message) -> None:
    a = _node()
    assert a.receive("b", msg, 1.0) == []
    assert a.stats["rejected"] == 1 and "push-pull" in a.last_rejection
    assert a.members["c"].state == ALIVE and a.members["c"].inc == 0
    with pytest.raises(ProtocolError):
        pushpull.check_chunk(msg, 3)


def test_garbled_chunks_do_not_decode() -> None:
    raw = encode(Message(PUSH, pushpull.seq_of(1, 0, 1), "", [(DEAD, "c", 9, "b")]))
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError):
            decode(raw[:cut])
    with pytest.raises(ProtocolError):
        decode(raw + b"\0")


def test_interval_scales_with_log_n_like_memberlist() -> None:
    assert pushpull.interval(30.0, 8) == 30.0
    assert pushpull.interval(30.0, 32) == 30.0
    assert pushpull.interval(30.0, 200) == 120.0
    assert pushpull.interval(30.0, 1000) == 180.0


def test_simulated_fleet_exchanges_tables_and_plain_swim_does_not() -> None:
    for lifeguard in (True, False):
        net = SimNet(40, seed=3, config=SwimConfig(lifeguard=lifeguard), loss=0.01)
        net.run_until(150.0)
        stats = [n.stats for n in net.nodes.values()]
        exchanged = sum(s["push_pulls"] for s in stats)
        assert (exchanged > 40) if lifeguard else (exchanged == 0)
        assert sum(s["deaths"] for s in stats) == 0
        assert sum(s["rejected"] for s in stats) == 0
