"""Issue 19 item 8: a failing message must not take earlier messages' WAL records with it.

Votes are persisted lazily: a backup's PRE-PREPARE and PREPARE records wait in the core
until its next COMMIT needs them durable, and the COMMIT's handler moves them into that
message's actions. If the handler then fails (a bug, or a ProtocolError found late), the
actions of that message are dropped; at 9038843 the records went with them, so a later
COMMIT left while the records it depends on were never written.
"""

from __future__ import annotations

import pytest
from test_replica_unit import CODEC, Net

from dwcp.consensus import Broadcast, Compact, Persist, Replica
from dwcp.consensus.actions import Action
from dwcp.consensus.messages import Codec, Kind, Prepare, PrePrepare, Request
from dwcp.errors import ProtocolError


def _round(net: Net, codec: Codec, seq: int) -> tuple[bytes, bytes]:
    """A PRE-PREPARE for ``seq`` from primary 0 and the PREPARE of replica 2 for it."""
    req = codec.encode(Request(seq, b"op%d" % seq), 0, net.ckeys[0])
    pp = codec.encode(PrePrepare(0, seq, (req,)), 0, net.rkeys[0])
    d = CODEC.decode(pp).msg.digest  # type: ignore[attr-defined]
    return pp, codec.encode(Prepare(0, seq, d), 2, net.rkeys[2])


def _fail_once(monkeypatch: pytest.MonkeyPatch, rep: Replica, exc: Exception) -> None:
    """Make the second execution step raise once: in ``p1``'s handler, after its COMMIT.

    (``pp1``'s handler runs the first one.)"""
    real = rep.normal.execute
    calls = {"n": 0}

    def flaky(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise exc
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(rep.normal, "execute", flaky)


def _wal(actions: list[Action], wal: list[bytes]) -> None:
    for a in actions:
        if isinstance(a, Persist):
            wal.append(a.record)
        elif isinstance(a, Compact):
            wal[:] = a.records


def _commit_at(actions: list[Action], seq: int) -> int:
    """Index of our COMMIT for ``seq`` among ``actions``."""
    for i, a in enumerate(actions):
        if isinstance(a, Broadcast):
            s = CODEC.decode(a.data)
            if s.kind is Kind.COMMIT and s.msg.seq == seq:  # type: ignore[union-attr]
                return i
    raise AssertionError(f"no COMMIT for {seq} was sent")


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), ProtocolError("found late")])
def test_records_survive_a_failing_message_in_a_batch(
    monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    net = Net.make()
    codec = Codec(net.config)
    r1 = net.replica(1)
    pp1, p1 = _round(net, codec, 1)
    _fail_once(monkeypatch, r1, exc)
    wal: list[bytes] = []
    # p1 makes seq 1 prepared: r1 signs its COMMIT (moving pp1's record out of the lazy
    # queue), then execution raises.
    _wal(r1.receive_batch([pp1, p1], 0.0), wal)
    pp2, p2 = _round(net, codec, 2)
    out = r1.receive_batch([pp2, p2], 0.0)
    commit_at = _commit_at(out, 2)
    _wal(out[:commit_at], wal)
    # Durable before our next COMMIT leaves: the records of seq 1 as well as seq 2.
    assert {pp1, p1, pp2, p2} <= set(wal)


def test_records_survive_a_failing_single_receive(monkeypatch: pytest.MonkeyPatch) -> None:
    """``receive`` lets a bug propagate (the simulator must see it); the records it had
    already taken out of the lazy queue are written with the next output instead."""
    net = Net.make()
    codec = Codec(net.config)
    r1 = net.replica(1)
    pp1, p1 = _round(net, codec, 1)
    _fail_once(monkeypatch, r1, RuntimeError("a bug"))
    wal: list[bytes] = []
    _wal(r1.receive(pp1, 0.0), wal)
    with pytest.raises(RuntimeError):
        r1.receive(p1, 0.0)
    pp2, p2 = _round(net, codec, 2)
    _wal(r1.receive(pp2, 0.0), wal)
    out = r1.receive(p2, 0.0)
    commit_at = _commit_at(out, 2)
    _wal(out[:commit_at], wal)
    assert {pp1, p1, pp2, p2} <= set(wal)


def test_a_failed_message_s_records_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """What is kept from a failed message replays: a restart from that log knows seq 1."""
    net = Net.make()
    codec = Codec(net.config)
    r1 = net.replica(1)
    pp1, p1 = _round(net, codec, 1)
    _fail_once(monkeypatch, r1, ProtocolError("found late"))
    wal: list[bytes] = []
    _wal(r1.receive_batch([pp1, p1], 0.0), wal)
    fresh = Replica(net.config, 1, net.rkeys[1], type(r1.app)())
    fresh.recover(wal, 0.0)
    assert fresh.log_size >= 1
