"""Unit tests of the PBFT replica with a tiny synchronous in-test network (4 replicas)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from dwcp.consensus import (
    Broadcast,
    Client,
    ClusterConfig,
    Committed,
    Compact,
    Completed,
    Executed,
    Persist,
    Replica,
    ReplyTo,
    Send,
    ViewChanged,
    VMRegistry,
    decode_result,
    encode_op,
)
from dwcp.consensus.actions import Action, Recovered, StateTransferred
from dwcp.consensus.log import encode_state
from dwcp.consensus.messages import (
    Checkpoint,
    Codec,
    Commit,
    Kind,
    NewView,
    Prepare,
    PrePrepare,
    Replies,
    Request,
    State,
    digest,
)
from dwcp.identity import NodeKey

CODEC = Codec(
    ClusterConfig(
        b"test-cluster",
        tuple(k.public for k in [NodeKey(bytes([1, i]) * 16) for i in range(4)]),
        (NodeKey(b"\x02\x00" * 16).public,),
    )
)
Drop = Callable[[int | str, int | str, bytes], bool]


def _keys(n: int, tag: int) -> list[NodeKey]:
    return [NodeKey(bytes([tag, i]) * 16) for i in range(n)]


@dataclass
class Net:
    """All nodes in one process; messages delivered FIFO, synchronously, with a drop filter."""

    config: ClusterConfig
    rkeys: list[NodeKey]
    ckeys: list[NodeKey]
    replicas: list[Replica | None] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    wal: list[list[bytes]] = field(default_factory=list)
    queue: deque[tuple[int | str, int | str, bytes]] = field(default_factory=deque)
    now: float = 0.0
    drop: Drop | None = None
    executed: list[list[Executed]] = field(default_factory=list)
    committed: list[list[Committed]] = field(default_factory=list)
    events: list[tuple[int | str, object]] = field(default_factory=list)
    completed: list[list[Completed]] = field(default_factory=list)
    past: list[list[Executed]] = field(default_factory=list)

    @classmethod
    def make(cls, n_clients: int = 2, **kw: object) -> Net:
        rkeys, ckeys = _keys(4, 1), _keys(n_clients, 2)
        cfg = ClusterConfig(
            b"test-cluster",
            tuple(k.public for k in rkeys),
            tuple(k.public for k in ckeys),
            **kw,  # type: ignore[arg-type]
        )
        net = cls(cfg, rkeys, ckeys)
        for i in range(4):
            net.replicas.append(Replica(cfg, i, rkeys[i], VMRegistry()))
            net.wal.append([])
            net.executed.append([])
            net.committed.append([])
        for k in ckeys:
            net.clients.append(Client(cfg, k))
            net.completed.append([])
        return net

    def apply(self, src: int | str, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Persist):
                assert isinstance(src, int)
                self.wal[src].append(a.record)
            elif isinstance(a, Compact):
                assert isinstance(src, int)
                self.wal[src] = list(a.records)
            elif isinstance(a, Send):
                self.queue.append((src, a.to, a.data))
            elif isinstance(a, Broadcast):
                for i in range(4):
                    if i != src:
                        self.queue.append((src, i, a.data))
            elif isinstance(a, ReplyTo):
                ci = self.config.client_index(a.client)
                assert ci is not None
                self.queue.append((src, f"c{ci}", a.data))
            elif isinstance(a, Executed):
                assert isinstance(src, int)
                self.executed[src].append(a)
            elif isinstance(a, Committed):
                assert isinstance(src, int)
                self.committed[src].append(a)
            else:
                self.events.append((src, a))

    def client_send(self, ci: int, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.queue.append((f"c{ci}", a.to, a.data))
            elif isinstance(a, Broadcast):
                for i in range(4):
                    self.queue.append((f"c{ci}", i, a.data))

    def run(self, limit: int = 100_000) -> None:
        steps = 0
        while self.queue:
            steps += 1
            assert steps < limit, "message storm"
            src, dst, data = self.queue.popleft()
            if self.drop is not None and self.drop(src, dst, data):
                continue
            if isinstance(dst, str):
                ci = int(dst[1:])
                self.completed[ci].extend(self.clients[ci].receive(data, self.now))
                continue
            r = self.replicas[dst]
            if r is not None:
                self.apply(dst, r.receive(data, self.now))

    def advance(self, dt: float, step: float = 0.05) -> None:
        end = self.now + dt
        while self.now < end:
            self.now = min(end, self.now + step)
            for i, r in enumerate(self.replicas):
                if r is not None:
                    d = r.next_deadline()
                    if d is not None and d <= self.now:
                        self.apply(i, r.tick(self.now))
            for ci, c in enumerate(self.clients):
                d = c.next_deadline()
                if d is not None and d <= self.now:
                    self.client_send(ci, c.tick(self.now))
            self.run()

    def request(self, ci: int, op: bytes) -> None:
        self.client_send(ci, self.clients[ci].request(op, self.now))

    def restart(self, i: int, *, wipe: bool = False) -> list[Action]:
        app = VMRegistry()
        r = Replica(self.config, i, self.rkeys[i], app, recovering=wipe)
        if wipe:
            self.wal[i] = []
        # A new incarnation rebuilds its state and may execute the same batches again.
        self.past.append(self.executed[i])
        self.executed[i] = []
        actions = r.recover(list(self.wal[i]), self.now)
        self.replicas[i] = r
        self.apply(i, actions)
        return actions

    def replica(self, i: int) -> Replica:
        r = self.replicas[i]
        assert r is not None
        return r


def _check_safety(net: Net) -> None:
    """Honest replicas executed the same requests in the same order, each at most once."""
    by_seq: dict[int, list[bytes]] = {}
    for execs in net.executed + net.past:
        mine: dict[int, list[bytes]] = {}
        for e in execs:
            mine.setdefault(e.seq, []).append(e.request_digest)
        rds = [e.request_digest for e in execs]
        assert len(set(rds)) == len(rds)  # at most once per incarnation
        for seq, lst in mine.items():
            assert by_seq.setdefault(seq, lst) == lst
    digests: dict[int, bytes] = {}
    for commits in net.committed:
        for c in commits:
            assert digests.setdefault(c.seq, c.digest) == c.digest


def test_normal_case_commit_and_reply() -> None:
    net = Net.make()
    net.request(0, encode_op("register", "vm1", "hostA"))
    net.run()
    assert len(net.completed[0]) == 1
    done = net.completed[0][0]
    assert decode_result(done.result).ok
    assert len(done.proof) >= 2
    for i in range(4):
        assert [e.seq for e in net.executed[i]] == [1]
        assert net.replica(i).last_executed == 1
    assert net.replica(0).stats["primary_prepare"] == 0
    _check_safety(net)
    # Every replica persisted something before voting.
    assert all(net.wal[i] for i in range(4))


def test_at_most_once_and_cached_reply() -> None:
    net = Net.make()
    net.request(0, encode_op("register", "vm1", "hostA"))
    net.run()
    raw = net.clients[0]._raw
    # The client's old request re-sent to everyone is not executed twice; replicas re-reply.
    for i in range(4):
        net.queue.append(("c0", i, raw))
    net.run()
    for i in range(4):
        assert len(net.executed[i]) == 1
        assert net.replica(i).stats["resent_reply"] == 1


def test_batching_under_load() -> None:
    net = Net.make(n_clients=20, max_batch=8, max_inflight=1)
    for ci in range(20):
        net.request(ci, encode_op("register", f"vm{ci}", "hostA"))
    net.run()
    assert all(len(c) == 1 for c in net.completed)
    seqs = {e.seq for e in net.executed[1]}
    assert len(seqs) < 20  # several requests shared one PRE-PREPARE
    assert len(net.executed[1]) == 20
    _check_safety(net)


def test_batch_is_answered_by_one_signed_replies_message() -> None:
    net = Net.make(n_clients=6, max_batch=8, max_inflight=1)
    sent: list[tuple[int, bytes, bytes]] = []
    apply = net.apply

    def spy(src: int | str, actions: list[Action]) -> None:
        sent.extend((src, a.client, a.data) for a in actions if isinstance(a, ReplyTo))
        apply(src, actions)

    net.apply = spy  # type: ignore[method-assign]
    for ci in range(6):
        net.request(ci, encode_op("register", f"vm{ci}", "hostA"))
    net.run()
    assert all(len(c) == 1 for c in net.completed)
    # The first request went alone (REPLY); the other five shared a batch: one REPLIES per
    # replica, signed once and addressed to each of the five clients.
    from_1 = [(client, data) for src, client, data in sent if src == 1]
    kinds = [CODEC.decode(data).kind for _, data in from_1]
    assert kinds.count(Kind.REPLY) == 1 and kinds.count(Kind.REPLIES) == 5
    assert len({data for _, data in from_1 if CODEC.decode(data).kind is Kind.REPLIES}) == 1
    done = net.completed[5][0]
    proof = [Codec(net.config).open(raw) for raw in done.proof]
    assert len({p.sender for p in proof}) >= 2
    for p in proof:
        assert isinstance(p.msg, Replies)
        assert p.msg.result_for(5, done.timestamp) == done.result
    _check_safety(net)


def test_requests_received_together_share_one_pre_prepare() -> None:
    """receive_batch proposes once after the last message, instead of per request."""
    net = Net.make(n_clients=5, max_inflight=4)
    raws = []
    for ci in range(5):
        (send,) = net.clients[ci].request(encode_op("register", f"vm{ci}", "hostA"), net.now)
        assert isinstance(send, Send) and send.to == 0
        raws.append(send.data)
    actions = net.replica(0).receive_batch(raws, net.now)
    pps = [CODEC.decode(a.data) for a in actions if isinstance(a, Broadcast)]
    assert [p.kind for p in pps] == [Kind.PRE_PREPARE]
    assert isinstance(pps[0].msg, PrePrepare) and len(pps[0].msg.requests) == 5
    net.apply(0, actions)
    net.run()
    assert all(len(c) == 1 for c in net.completed)
    # One by one, the first request is proposed alone (room in the pipeline).
    net2 = Net.make(n_clients=5, max_inflight=4)
    for ci in range(5):
        net2.request(ci, encode_op("register", f"vm{ci}", "hostA"))
    net2.run()
    assert len(net2.executed[1]) == 5 and net2.executed[1][0].seq == 1
    assert {e.seq for e in net2.executed[1]} != {1}
    _check_safety(net)
    _check_safety(net2)


def test_client_ignores_replies_without_its_entry() -> None:
    net = Net.make(n_clients=2)
    net.request(0, encode_op("register", "vm1", "hostA"))
    client = net.clients[0]
    assert client._ts is not None
    codec = Codec(net.config)
    other = Replies(0, ((1, client._ts, b"r"), (0, client._ts + 1, b"r")))
    for i in (1, 2, 3):
        assert client.receive(codec.encode(other, i, net.rkeys[i]), 0.0) == []
    assert client.stats["stale"] == 3 and client.busy
    mine = Replies(0, ((1, 5, b"x"), (0, client._ts, b"r")))
    forged = codec.encode(mine, 2, net.rkeys[1])  # replica 1's key, claiming to be replica 2
    assert client.receive(forged, 0.0) == []
    assert client.stats["bad_signature"] == 1
    assert client.receive(codec.encode(mine, 1, net.rkeys[1]), 0.0) == []
    (done,) = client.receive(codec.encode(mine, 3, net.rkeys[3]), 0.0)
    assert done.result == b"r" and len(done.proof) == 2 and not client.busy


def test_primary_prepare_and_duplicate_votes_are_ignored() -> None:
    net = Net.make()
    codec = Codec(net.config)
    r1 = net.replica(1)
    creq = codec.encode(Request(1, encode_op("get", "x")), 0, net.ckeys[0])
    pp = PrePrepare(0, 1, (creq,))
    r1.receive(codec.encode(pp, 0, net.rkeys[0]), 0.0)
    # A PREPARE signed by the primary must not count.
    r1.receive(codec.encode(Prepare(0, 1, pp.digest), 0, net.rkeys[0]), 0.0)
    assert r1.stats["primary_prepare"] == 1
    # The same backup's PREPARE twice counts once: with replica 1's own vote that is 2f = 2.
    p2 = codec.encode(Prepare(0, 1, pp.digest), 2, net.rkeys[2])
    r1.receive(p2, 0.0)
    acts = r1.receive(p2, 0.0)
    assert acts == [] and r1.stats["duplicate"] == 1
    # Replica 1 (own prepare) + replica 2 = 2f prepares: prepared, so it sends a COMMIT.
    assert r1.normal.log[(0, 1)].prepared


def test_equivocating_pre_prepare_is_rejected() -> None:
    net = Net.make()
    codec = Codec(net.config)
    r1 = net.replica(1)
    a = codec.encode(Request(1, b"a"), 0, net.ckeys[0])
    b = codec.encode(Request(2, b"b"), 0, net.ckeys[0])
    out1 = r1.receive(codec.encode(PrePrepare(0, 1, (a,)), 0, net.rkeys[0]), 0.0)
    # The log is made non-empty before the first vote leaves (a restart must know it voted).
    kinds = [type(x).__name__ for x in out1]
    assert kinds.index("Persist") < kinds.index("Broadcast")
    out2 = r1.receive(codec.encode(PrePrepare(0, 1, (b,)), 0, net.rkeys[0]), 0.0)
    assert out2 == [] and r1.stats["equivocation"] == 1


def test_forged_and_invalid_input_changes_nothing() -> None:
    net = Net.make()
    codec = Codec(net.config)
    r1 = net.replica(1)
    before = (r1.view, r1.last_executed, dict(r1.normal.log))
    creq = codec.encode(Request(1, b"op"), 0, net.ckeys[0])
    # PRE-PREPARE signed by a backup's key but claiming to be the primary.
    forged = codec.encode(PrePrepare(0, 1, (creq,)), 0, net.rkeys[3])
    assert r1.receive(forged, 0.0) == []
    # A request inside a batch with a broken client signature.
    bad_req = creq[:-1] + bytes([creq[-1] ^ 1])
    assert r1.receive(codec.encode(PrePrepare(0, 1, (bad_req,)), 0, net.rkeys[0]), 0.0) == []
    for junk in (b"", b"\xc1", b"\x94" * 10, b"x" * 100, bytes(range(256))):
        assert r1.receive(junk, 0.0) == []
    assert r1.receive(b"\x00" * (net.config.max_message_bytes + 1), 0.0) == []
    assert (r1.view, r1.last_executed, dict(r1.normal.log)) == before
    assert r1.stats["bad_signature"] >= 2 and r1.stats["malformed"] >= 5


def test_unauthorised_client_is_refused() -> None:
    net = Net.make()
    stranger = NodeKey(b"\x09" * 32)
    codec = Codec(net.config)
    # Signed by a key that is not client 0's: does not verify as client 0.
    raw = codec.encode(Request(1, b"op"), 0, stranger)
    assert net.replica(0).receive(raw, 0.0) == []
    assert net.replica(0).stats["bad_signature"] == 1


def test_checkpoint_gc_and_watermarks() -> None:
    net = Net.make(checkpoint_interval=4, watermark_window=8)
    for i in range(10):
        net.request(0, encode_op("register", f"vm{i}", "h"))
        net.run()
        assert len(net.completed[0]) == i + 1
    for i in range(4):
        r = net.replica(i)
        assert r.last_executed == 10
        assert r.stable_seq == 8
        assert all(seq > 8 for (_, seq) in r.normal.log)
        assert r.log_size <= 8
        # The compacted WAL starts with the stable state.
        assert Codec(net.config).decode(net.wal[i][0], limit=1 << 30).kind is Kind.STATE


def test_view_change_after_primary_silence() -> None:
    net = Net.make(view_change_timeout=1.0, client_retry=0.5)
    net.request(0, encode_op("register", "vm1", "h"))
    net.run()
    # The primary (0) goes silent.
    net.replicas[0] = None
    net.request(0, encode_op("register", "vm2", "h"))
    net.run()
    assert len(net.completed[0]) == 1
    net.advance(10.0)
    assert len(net.completed[0]) == 2
    for i in (1, 2, 3):
        assert net.replica(i).view == 1 and net.replica(i).active
    assert any(isinstance(e, ViewChanged) and e.view == 1 for _, e in net.events)
    assert net.clients[0].view == 1
    _check_safety(net)


def _view0_commit(s: int | str, d: int | str, data: bytes) -> bool:
    msg = CODEC.decode(data).msg
    return isinstance(msg, Commit) and msg.view == 0


def test_view_change_carries_prepared_request() -> None:
    """A request prepared but not committed in view 0 is re-proposed in view 1 (same seq)."""
    net = Net.make(view_change_timeout=1.0)
    # Drop all COMMITs: the request prepares everywhere but nobody commits it.
    net.drop = lambda s, d, data: Codec(net.config).decode(data).kind is Kind.COMMIT
    net.request(0, encode_op("register", "vm1", "h"))
    net.run()
    assert all(net.replica(i).normal.certs.get(1) is not None for i in range(4))
    assert not net.completed[0]
    # Commits of view 0 stay lost (so retransmission cannot finish it) and the primary dies.
    net.drop = _view0_commit
    net.replicas[0] = None
    net.advance(10.0)
    assert len(net.completed[0]) == 1
    for i in (1, 2, 3):
        assert [e.seq for e in net.executed[i]] == [1]
        assert net.replica(i).view >= 1
    _check_safety(net)


def test_bogus_new_view_is_rejected() -> None:
    net = Net.make(view_change_timeout=1.0)
    codec = Codec(net.config)
    net.request(0, encode_op("register", "vm1", "h"))
    net.run()
    # Collect real VIEW-CHANGEs for view 1 by making replicas 1,2,3 time out.
    captured: list[bytes] = []

    def spy(s: int | str, d: int | str, data: bytes) -> bool:
        sig = codec.decode(data)
        if sig.kind is Kind.VIEW_CHANGE:
            captured.append(data)
        return sig.kind is Kind.NEW_VIEW  # hold back the real NEW-VIEW

    net.drop = spy
    net.replicas[0] = None
    net.request(0, encode_op("register", "vm2", "h"))
    net.advance(2.5)
    vcs = list(dict.fromkeys(captured))
    r2 = net.replica(2)
    assert not r2.active and r2.view == 1
    # Replica 1 (primary of view 1) equivocates: O re-proposes a forged request at seq 2.
    fake = codec.encode(Request(99, b"evil"), 1, net.ckeys[1])
    bad_o = (codec.encode(PrePrepare(1, 2, (fake,)), 1, net.rkeys[1]),)
    senders = sorted({codec.decode(v).sender: v for v in vcs}.items())[:3]
    nv = NewView(1, tuple(v for _, v in senders), bad_o)
    assert r2.receive(codec.encode(nv, 1, net.rkeys[1]), net.now) == []
    assert r2.stats["bogus_new_view"] == 1 and not r2.active
    # Too few VIEW-CHANGEs.
    nv2 = NewView(1, tuple(v for _, v in senders[:2]), ())
    assert r2.receive(codec.encode(nv2, 1, net.rkeys[1]), net.now) == []
    # Not from the new primary.
    nv3 = NewView(1, tuple(v for _, v in senders), ())
    assert r2.receive(codec.encode(nv3, 3, net.rkeys[3]), net.now) == []
    assert not r2.active


def test_wal_crash_and_replay_keeps_votes() -> None:
    net = Net.make(checkpoint_interval=4, watermark_window=8)
    for i in range(6):
        net.request(0, encode_op("register", f"vm{i}", "h"))
        net.run()
    r2 = net.replica(2)
    assert r2.last_executed == 6 and r2.stable_seq == 4
    acts = net.restart(2)
    r2b = net.replica(2)
    # COMMITs are persisted lazily, so the last batch may need to be learned again; the
    # stable checkpoint and every vote it sent are back.
    assert r2b.stable_seq == 4 and r2b.last_executed in (5, 6)
    assert r2b.view == 0 and r2b.active
    assert not [a for a in acts if isinstance(a, Broadcast | Send)]
    for i in range(3):
        net.request(0, encode_op("register", f"vm-after{i}", "h"))
        net.run()
    net.advance(2.0)
    assert net.replica(2).last_executed == 9
    assert net.replica(2).app.digest() == net.replica(0).app.digest()  # type: ignore[attr-defined]
    _check_safety(net)


def test_prepared_certificate_survives_restart() -> None:
    net = Net.make(view_change_timeout=1.0)
    net.drop = lambda s, d, data: Codec(net.config).decode(data).kind is Kind.COMMIT
    net.request(0, encode_op("register", "vm1", "h"))
    net.run()
    net.drop = None
    for i in (1, 2, 3):
        net.restart(i)
        assert net.replica(i).normal.certs.get(1) is not None
    net.replicas[0] = None
    net.advance(10.0)
    assert len(net.completed[0]) == 1
    _check_safety(net)


def test_state_transfer_for_lagging_replica() -> None:
    net = Net.make(checkpoint_interval=4, watermark_window=8)
    # Replica 3 is cut off while the others run 12 requests.
    net.drop = lambda s, d, data: d == 3 or s == 3
    for i in range(12):
        net.request(0, encode_op("register", f"vm{i}", "h"))
        net.run()
    assert net.replica(3).last_executed == 0
    net.drop = None
    net.request(0, encode_op("register", "vm-last", "h"))
    net.run()
    net.advance(3.0)
    r3 = net.replica(3)
    assert r3.last_executed >= 12
    assert any(isinstance(e, StateTransferred) for s, e in net.events if s == 3)
    assert r3.app.digest() == net.replica(0).app.digest() or r3.last_executed == 12  # type: ignore[attr-defined]


def test_amnesia_replica_recovers_before_voting() -> None:
    net = Net.make(checkpoint_interval=2, watermark_window=4)
    for i in range(3):
        net.request(0, encode_op("register", f"vm{i}", "h"))
        net.run()
    acts = net.restart(3, wipe=True)
    r3 = net.replica(3)
    assert r3.recovering
    # The first action makes "I am recovering" durable: a crash now cannot make it fresh.
    assert [type(a) for a in acts] == [Persist]
    assert net.wal[3]
    # Restarted from that log it is still recovering.
    assert net.restart(3) == [] and net.replica(3).recovering
    r3 = net.replica(3)
    net.advance(0.2)
    assert r3.recovering and r3.stats["status_queries"] >= 1
    for i in range(12):
        net.request(0, encode_op("register", f"vm-b{i}", "h"))
        net.run()
        prepares = [
            d
            for s, d, data in net.queue
            if s == 3 and Codec(net.config).decode(data).kind in (Kind.PREPARE, Kind.COMMIT)
        ]
        assert not prepares
    net.advance(3.0)
    assert not r3.recovering
    assert any(isinstance(e, Recovered) for s, e in net.events if s == 3)
    net.request(0, encode_op("register", "vm-final", "h"))
    net.run()
    assert r3.last_executed == net.replica(0).last_executed
    _check_safety(net)


@pytest.mark.parametrize("bad_view", [0])
def test_old_view_messages_are_dropped(bad_view: int) -> None:
    net = Net.make(view_change_timeout=1.0)
    net.replicas[0] = None
    net.request(0, encode_op("register", "vm1", "h"))
    net.advance(10.0)
    r1 = net.replica(1)
    assert r1.view >= 1
    codec = Codec(net.config)
    stale = codec.encode(Commit(bad_view, 1, b"\x00" * 32), 2, net.rkeys[2])
    assert [a for a in r1.receive(stale, net.now) if not isinstance(a, Send)] == []
    assert r1.stats["old_view"] >= 1


def test_join_view_change_after_f_plus_one() -> None:
    net = Net.make()
    sent: list[bytes] = []
    for i in (1, 2):
        out: list[Action] = []
        net.replica(i).views.start_view_change(1, 0.0, out)
        sent += [a.data for a in out if isinstance(a, Broadcast)]
    r3 = net.replica(3)
    assert r3.receive(sent[0], 0.0) == [] or r3.active
    assert r3.view == 0 and r3.active  # one VIEW-CHANGE (f) is not enough
    out3 = r3.receive(sent[1], 0.0)
    assert r3.view == 1 and not r3.active  # f + 1: it joins
    assert any(isinstance(a, Broadcast) for a in out3)


def test_view_change_timer_doubles_while_new_views_fail() -> None:
    net = Net.make(view_change_timeout=1.0, client_retry=0.2)
    net.drop = lambda s, d, data: CODEC.decode(data).kind is Kind.NEW_VIEW
    net.replicas[0] = None
    net.request(0, encode_op("register", "vm1", "h"))
    starts: list[tuple[float, int]] = []
    for _ in range(1200):
        net.advance(0.05, step=0.05)
        v = net.replica(1).view
        if not starts or starts[-1][1] != v:
            starts.append((net.now, v))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(starts[1:])]
    assert len(gaps) >= 3
    for a, b in itertools.pairwise(gaps):
        assert b >= 1.9 * a  # each failed view change doubles the timeout (virtual time)


def test_lost_commits_are_retransmitted_without_a_view_change() -> None:
    net = Net.make(view_change_timeout=5.0, client_retry=0.2)
    net.drop = lambda s, d, data: CODEC.decode(data).kind is Kind.COMMIT
    net.request(0, encode_op("register", "vm1", "h"))
    net.run()
    assert not net.completed[0]
    net.drop = None
    net.advance(1.0)
    assert len(net.completed[0]) == 1
    assert all(net.replica(i).view == 0 for i in range(4))
    assert net.replica(1).stats["retransmissions"] >= 1


def test_fuzzed_input_never_raises() -> None:
    """Mutated real traffic (bytes flipped, cut, spliced) is dropped and counted, never raised."""
    import random

    net = Net.make(checkpoint_interval=2, watermark_window=4)
    corpus: list[bytes] = []
    apply = net.apply

    def spy(src: int | str, actions: list[Action]) -> None:
        corpus.extend(a.data for a in actions if isinstance(a, Send | Broadcast | ReplyTo))
        apply(src, actions)

    net.apply = spy  # type: ignore[method-assign]
    for i in range(5):
        net.request(0, encode_op("register", f"vm{i}", "h"))
        net.run()
    rng = random.Random(7)
    target = net.replica(2)
    before = (target.view, target.last_executed, target.stable_seq)
    for _ in range(1500):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 3)):
            r = rng.random()
            if r < 0.5 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif r < 0.75:
                del data[rng.randrange(len(data) + 1) :]
            else:
                i = rng.randrange(len(data) + 1)
                data[i:i] = rng.randbytes(rng.randint(1, 8))
        target.receive(bytes(data), net.now)
    assert (target.view, target.last_executed, target.stable_seq) == before
    assert target.stats["malformed"] + target.stats["bad_signature"] > 1000


def test_forged_state_transfer_is_rejected() -> None:
    net = Net.make(checkpoint_interval=2, watermark_window=4)
    codec = Codec(net.config)
    net.drop = lambda s, d, data: d == 3 or s == 3
    for i in range(4):
        net.request(0, encode_op("register", f"vm{i}", "h"))
        net.run()
    r0, r3 = net.replica(0), net.replica(3)
    good = State(r0.stable_seq, r0.checkpoints.stable_blob, r0.checkpoints.stable_proof)
    # Right proof, different state: the digest does not match.
    evil = VMRegistry()
    evil.execute(encode_op("register", "vm0", "mallory"))
    bad_blob = State(good.seq, encode_state(evil.snapshot(), {}), good.proof)
    assert r3.receive(codec.encode(bad_blob, 1, net.rkeys[1]), 0.0) == []
    # A proof with only f + 1 signatures (a Byzantine pair cannot fake a checkpoint).
    fake_d = digest(bad_blob.blob)
    short = tuple(codec.encode(Checkpoint(good.seq, fake_d), i, net.rkeys[i]) for i in (1, 2))
    forged = State(good.seq, bad_blob.blob, short)
    assert r3.receive(codec.encode(forged, 1, net.rkeys[1]), 0.0) == []
    assert r3.last_executed == 0 and r3.stats["invalid"] == 2
    # The genuine one is accepted.
    out = r3.receive(codec.encode(good, 1, net.rkeys[1]), 0.0)
    assert any(isinstance(a, StateTransferred) for a in out)
    assert r3.last_executed == good.seq
    assert r3.app.digest() == r0.app.digest() or r0.last_executed > good.seq  # type: ignore[attr-defined]


def test_unreadable_log_record_is_a_wal_error() -> None:
    from dwcp.errors import WalError

    net = Net.make()
    r = Replica(net.config, 1, net.rkeys[1], VMRegistry())
    with pytest.raises(WalError, match="recovering"):
        r.recover([b"\x94garbage"], 0.0)


def test_certificate_is_durable_before_commit() -> None:
    """The PRE-PREPARE and PREPAREs of a certificate are persisted before our COMMIT leaves."""
    net = Net.make()
    codec = Codec(net.config)
    r1 = net.replica(1)
    req = codec.encode(Request(1, b"op"), 0, net.ckeys[0])
    pp = codec.encode(PrePrepare(0, 1, (req,)), 0, net.rkeys[0])
    r1.receive(pp, 0.0)
    p2 = codec.encode(Prepare(0, 1, CODEC.decode(pp).msg.digest), 2, net.rkeys[2])  # type: ignore[attr-defined]
    out = r1.receive(p2, 0.0)
    commit_at = next(i for i, a in enumerate(out) if isinstance(a, Broadcast))
    persisted = {a.record for a in out[:commit_at] if isinstance(a, Persist)}
    assert {pp, p2} <= persisted
    assert CODEC.decode(out[commit_at].data).kind is Kind.COMMIT  # type: ignore[union-attr]


def test_restarted_replica_is_silent_in_its_crash_view() -> None:
    """Votes before a COMMIT are written lazily, so a replica restarted from its log does not
    vote again in the view it crashed in; after the next view change it votes normally."""
    net = Net.make(view_change_timeout=1.0)
    net.request(0, encode_op("register", "vm1", "h"))
    net.run()
    net.restart(3)
    r3 = net.replica(3)
    sent: list[Kind] = []
    apply = net.apply

    def spy(src: int | str, actions: list[Action]) -> None:
        if src == 3:
            sent.extend(CODEC.decode(a.data).kind for a in actions if isinstance(a, Broadcast))
        apply(src, actions)

    net.apply = spy  # type: ignore[method-assign]
    net.request(0, encode_op("register", "vm2", "h"))
    net.run()
    assert len(net.completed[0]) == 2  # the other three commit without it
    assert Kind.PREPARE not in sent and Kind.COMMIT not in sent
    # With the primary gone the cluster needs replica 3: a view change brings it back.
    net.replicas[0] = None
    net.request(0, encode_op("register", "vm3", "h"))
    net.advance(10.0)
    assert len(net.completed[0]) == 3
    assert r3.view >= 1 and Kind.COMMIT in sent
    _check_safety(net)


def test_a_core_error_on_one_message_keeps_the_batch_s_other_actions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug triggered by one input must not drop the actions (and WAL records) of the
    messages handled before it in the same batch."""
    net = Net.make(n_clients=3, max_inflight=4)
    raws = []
    for ci in range(3):
        (send,) = net.clients[ci].request(encode_op("register", f"vm{ci}", "hostA"), net.now)
        raws.append(send.data)
    rep = net.replica(0)
    real = rep._handle

    def flaky(data: bytes, now: float, out: list[Action]) -> None:
        if data == raws[1]:
            raise RuntimeError("a bug")
        real(data, now, out)

    monkeypatch.setattr(rep, "_handle", flaky)
    actions = rep.receive_batch(raws, net.now)
    assert rep.stats["internal_errors"] == 1
    pps = [CODEC.decode(a.data) for a in actions if isinstance(a, Broadcast)]
    assert isinstance(pps[0].msg, PrePrepare) and len(pps[0].msg.requests) == 2
