"""A replica waiting for a NEW-VIEW re-sends its VIEW-CHANGE before it gives the view up.

Issue 19 item 9 (seeds 696 and 1335 of the amnesia schedules): the re-send period
was the view-change timeout itself, so a VIEW-CHANGE lost on its way to the new
primary was re-sent at the very instant the others' timers moved them on to the
next view. With one replica recovering (and so not voting) every view then failed
in turn and the timeouts doubled past the test's horizon. Virtual time only.
"""

from __future__ import annotations

from dwcp.consensus import Broadcast, ClusterConfig, Replica, VMRegistry, encode_op
from dwcp.consensus.actions import Action
from dwcp.consensus.messages import Codec, Request, ViewChange
from dwcp.identity import NodeKey


def _setup() -> tuple[Replica, Codec, list[NodeKey], list[NodeKey]]:
    rkeys = [NodeKey(bytes([7, i]) * 16) for i in range(4)]
    ckeys = [NodeKey(bytes([8, 0]) * 16)]
    cfg = ClusterConfig(
        b"resend-test",
        tuple(k.public for k in rkeys),
        tuple(k.public for k in ckeys),
        view_change_timeout=0.5,
        client_retry=0.3,
    )
    return Replica(cfg, 2, rkeys[2], VMRegistry()), Codec(cfg), rkeys, ckeys


def _view_changes(codec: Codec, actions: list[Action]) -> list[int]:
    views = []
    for a in actions:
        if isinstance(a, Broadcast):
            msg = codec.decode(a.data).msg
            if isinstance(msg, ViewChange):
                views.append(msg.view)
    return views


def test_view_change_is_resent_before_the_view_times_out() -> None:
    rep, codec, rkeys, ckeys = _setup()
    req = codec.encode(Request(1, encode_op("register", "vm1", "h0")), 0, ckeys[0])
    rep.receive(req, 0.0)  # the request is pending: the view-change timer runs
    sent: list[tuple[float, int]] = []
    now = 0.0
    # Primary 0 is silent: our timer fires and we move to view 1.
    while not sent:
        deadline = rep.next_deadline()
        assert deadline is not None
        now = deadline
        sent += [(now, v) for v in _view_changes(codec, rep.tick(now))]
    assert sent == [(now, 1)]
    started = now
    # The others join view 1 at once: a quorum of VIEW-CHANGEs, the new primary (1) is silent.
    for sender in (0, 3):
        vc = codec.encode(ViewChange(1, 0, (), ()), sender, rkeys[sender])
        rep.receive(vc, now)
    while all(v == 1 for _, v in sent):
        deadline = rep.next_deadline()
        assert deadline is not None
        now = deadline
        sent += [(now, v) for v in _view_changes(codec, rep.tick(now))]
    resends = [t for t, v in sent[1:] if v == 1]
    gave_up = next(t for t, v in sent if v == 2)
    assert resends, "our VIEW-CHANGE for view 1 was never re-sent"
    assert started < resends[0] < gave_up
