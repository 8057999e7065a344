"""The PBFT normal case: requests, PRE-PREPARE / PREPARE / COMMIT, execution in order.

The primary batches pending requests into PRE-PREPAREs (at most ``max_inflight``
unexecuted); backups PREPARE; 2f PREPAREs from distinct backups plus the
PRE-PREPARE make a request *prepared* (a PREPARE from the primary is ignored);
2f+1 COMMITs make it *committed*; batches execute in sequence order. What the
normal case needs from the other parts (a checkpoint every K sequence numbers,
helping a replica in an older view, fetching state when others run ahead) it asks
of its ``NormalHost``, the replica facade.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from dwcp.consensus.actions import Action, Broadcast, Committed, Executed, ReplyTo, Send
from dwcp.consensus.context import ReplicaContext
from dwcp.consensus.durability import Durability
from dwcp.consensus.log import CommittedBatch, Entry
from dwcp.consensus.messages import (
    Commit,
    Prepare,
    PrePrepare,
    Replies,
    Reply,
    Request,
    Signed,
    digest,
)
from dwcp.errors import ProtocolError

FUTURE_PER_SENDER = 256
FUTURE_BYTES = 4 << 20
PARSED_MAX = 1024
"""Parsed requests kept for execution (each at most max_request_bytes)."""
REPLIES_BYTES = 32 << 10
"""Result bytes per REPLIES message (a batch's replies are split above this)."""


class NormalHost(Protocol):
    """What the normal case asks of the rest of the replica."""

    def push_new_view(self, s: Signed, now: float, out: list[Action]) -> None:
        """``s`` is from an older view: help its sender into ours."""

    def beyond_window(self, s: Signed, seq: int, now: float, out: list[Action]) -> None:
        """``s`` is for ``seq``, far above our high watermark: maybe we fell behind."""

    def take_checkpoint(self, seq: int, now: float, out: list[Action]) -> None:
        """``seq`` (a multiple of the checkpoint interval) was just executed."""


class NormalCase:
    """The message log of the current views and the execution of committed batches."""

    def __init__(self, ctx: ReplicaContext, durability: Durability, host: NormalHost) -> None:
        self.ctx = ctx
        self.durability = durability
        self.host = host
        self.log: dict[tuple[int, int], Entry] = {}
        # Highest-view prepared entry per sequence number (what a VIEW-CHANGE carries).
        self.certs: dict[int, Entry] = {}
        self.committed: dict[int, CommittedBatch] = {}
        self.next_seq = 1
        self.pending: dict[int, tuple[int, bytes, bytes]] = {}
        self.inflight: dict[bytes, int] = {}
        # Requests verified on arrival, by digest, so execution does not parse them again.
        self.parsed: dict[bytes, tuple[int, Request]] = {}
        # Messages for a view not entered yet or just past the high watermark, by sender.
        self.future: dict[int, deque[bytes]] = {}
        self.hold_proposals = False
        self.proposal_held = False

    def entry(self, view: int, seq: int) -> Entry:
        e = self.log.get((view, seq))
        if e is None:
            e = self.log[(view, seq)] = Entry(view, seq)
        return e

    # --- requests ----------------------------------------------------------

    def reply(self, client: int, ts: int, result: bytes, out: list[Action]) -> None:
        ctx = self.ctx
        if ctx.replaying:
            return
        raw = ctx.sign(Reply(ctx.view, client, ts, result))
        out.append(ReplyTo(ctx.config.clients[client].raw, raw))

    def reply_batch(self, entries: list[tuple[int, int, bytes]], out: list[Action]) -> None:
        """Answer the requests of one executed batch: one signed REPLIES for all of them."""
        ctx = self.ctx
        if ctx.replaying or not entries:
            return
        if len(entries) == 1:
            self.reply(*entries[0], out)
            return
        clients = ctx.config.clients
        start, size = 0, 0
        for i, (_, _, result) in enumerate(entries):
            size += len(result) + 24
            if size > REPLIES_BYTES or i + 1 == len(entries):
                chunk = entries[start : i + 1]
                raw = ctx.sign(Replies(ctx.view, tuple(chunk)))
                for c in dict.fromkeys(c for c, _, _ in chunk):
                    out.append(ReplyTo(clients[c].raw, raw))
                start, size = i + 1, 0

    def on_request(self, s: Signed, msg: Request, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        c, ts = s.sender, msg.timestamp
        last = ctx.clients.get(c)
        if last is not None and ts < last[0]:
            ctx.stats["stale_request"] += 1
            return
        ctx.codec.verify(s)
        rd = digest(s.raw)
        self.remember_request(rd, s.sender, msg)
        top = ctx.stable_seq + ctx.config.watermark_window
        if last is not None and ts == last[0]:
            # Executed here; the client still waits, so others may lack our votes.
            ctx.stats["resent_reply"] += 1
            self.reply(c, ts, last[1], out)
            self.retransmit(top, now, out)
            return
        known = self.pending.get(c)
        repeat = known is not None and known[0] == ts
        if known is None or known[0] < ts:
            self.pending[c] = (ts, rd, s.raw)
        elif known[0] > ts:
            ctx.stats["stale_request"] += 1
            return
        if repeat or not ctx.is_primary:
            # Clients send to the primary first, so this is a re-sent request: someone is
            # missing messages. Re-send ours for the whole window (each at most once per
            # half client retry): a replica missing any earlier COMMIT cannot execute it.
            self.retransmit(top, now, out)
        if rd in self.inflight:
            pass
        elif ctx.is_primary:
            self.propose(now, out)
        elif ctx.active:
            out.append(Send(ctx.config.primary(ctx.view), s.raw))
        # Every replica (the primary too) waiting to execute a request runs the timer: a
        # primary that cannot finish its own proposals votes for its replacement.
        if ctx.active and ctx.vc_deadline is None:
            ctx.vc_deadline = now + ctx.timeout()

    def retransmit(self, seq: int, now: float, out: list[Action]) -> None:
        """Re-send our PRE-PREPARE/PREPARE/COMMIT of the current view up to ``seq``."""
        ctx = self.ctx
        if not ctx.active:
            return
        for n in range(ctx.stable_seq + 1, seq + 1):
            e = self.log.get((ctx.view, n))
            if e is None or now - e.resent_at < ctx.config.client_retry / 2:
                continue
            e.resent_at = now
            ctx.stats["retransmissions"] += 1
            if ctx.is_primary and e.pp_raw:
                out.append(Broadcast(e.pp_raw))
            for votes in (e.prepares, e.commits):
                own = votes.get(ctx.id)
                if own is not None:
                    out.append(Broadcast(own[1]))

    def propose(self, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if not (ctx.active and ctx.is_primary) or ctx.recovering:
            return
        if self.hold_proposals:
            self.proposal_held = True  # receive_batch proposes once, after the last message
            return
        if ctx.view <= self.durability.passive_view:
            return  # restarted in this view: we may not remember what we proposed
        cfg = ctx.config
        while self.next_seq - 1 - ctx.last_executed < cfg.max_inflight and ctx.window(
            self.next_seq
        ):
            batch = [raw for _, rd, raw in self.pending.values() if rd not in self.inflight]
            if not batch:
                return
            pp = PrePrepare(ctx.view, self.next_seq, tuple(batch[: cfg.max_batch]))
            raw = ctx.sign(pp)
            self.durability.lazy_persist(raw, out)  # durable before our COMMIT
            out.append(Broadcast(raw))
            self.install_pp(pp, raw, ctx.id)  # advances next_seq

    # --- votes -------------------------------------------------------------

    def install_pp(self, pp: PrePrepare, raw: bytes, sender: int) -> Entry | None:
        ctx = self.ctx
        if pp.seq <= ctx.stable_seq:
            return None
        e = self.entry(pp.view, pp.seq)
        if e.pp is not None:
            return None
        e.pp, e.pp_raw = pp, raw
        primary = ctx.config.primary(pp.view)
        if sender == ctx.id:
            self.next_seq = max(self.next_seq, pp.seq + 1)
        may_vote = self.durability.may_vote(pp.view)
        if primary != ctx.id and ctx.id not in e.prepares and may_vote:
            e.prepares[ctx.id] = (pp.digest, ctx.sign(Prepare(pp.view, pp.seq, pp.digest)))
        if pp.view == ctx.view:
            for rd in pp.request_digests:
                self.inflight[rd] = pp.seq
        return e

    def install_vote(self, msg: Prepare | Commit, sender: int, raw: bytes) -> Entry | None:
        if msg.seq <= self.ctx.stable_seq:
            return None
        e = self.entry(msg.view, msg.seq)
        votes = e.prepares if isinstance(msg, Prepare) else e.commits
        if sender not in votes:
            votes[sender] = (msg.digest, raw)
        return e

    def on_normal(
        self, s: Signed, msg: PrePrepare | Prepare | Commit, now: float, out: list[Action]
    ) -> None:
        ctx = self.ctx
        # Nothing below reacts to a message (buffer, push, fetch) before its signature verified.
        if msg.view < ctx.view:
            ctx.stats["old_view"] += 1
            self.host.push_new_view(s, now, out)
            return
        if msg.view > ctx.view or not ctx.active:
            ctx.codec.verify(s)
            self.buffer_future(s)
            return
        if not ctx.window(msg.seq):
            ctx.stats["out_of_window"] += 1
            high = ctx.stable_seq + ctx.config.watermark_window
            if high < msg.seq <= high + ctx.config.checkpoint_interval:
                # Just past our high watermark: the others saw the checkpoint stable before
                # us. Keep it for when ours is (replayed when the window moves).
                ctx.codec.verify(s)
                self.buffer_future(s)
                return
            if msg.seq > ctx.stable_seq:
                self.host.beyond_window(s, msg.seq, now, out)
            return
        e = self.log.get((msg.view, msg.seq))
        primary = ctx.config.primary(msg.view)
        if isinstance(msg, PrePrepare):
            if s.sender != primary:
                ctx.stats["not_primary"] += 1
                return
            if e is not None and e.pp is not None:
                ctx.stats["duplicate" if e.pp_raw == s.raw else "equivocation"] += 1
                return
            if len(msg.requests) > ctx.config.max_batch:
                ctx.stats["oversized_batch"] += 1
                return
            ctx.codec.verify(s)
            for req, rd in zip(msg.requests, msg.request_digests, strict=True):
                r = ctx.codec.decode(req, limit=ctx.config.max_request_bytes)
                if not isinstance(r.msg, Request):
                    raise ProtocolError("a batch may only hold requests")
                ctx.codec.verify(r)
                self.remember_request(rd, r.sender, r.msg)
            self.durability.lazy_persist(s.raw, out)  # durable before our COMMIT
            e = self.install_pp(msg, s.raw, s.sender)
            assert e is not None
            own = e.prepares.get(ctx.id)
            if own is not None:
                out.append(Broadcast(own[1]))
        else:
            if isinstance(msg, Prepare) and s.sender == primary:
                ctx.stats["primary_prepare"] += 1
                return
            votes = None if e is None else e.prepares if isinstance(msg, Prepare) else e.commits
            if votes is not None and s.sender in votes:
                ctx.stats["duplicate"] += 1
                return
            if e is not None and (e.committed if isinstance(msg, Commit) else e.prepared):
                ctx.stats["late_vote"] += 1
                return
            ctx.codec.verify(s)
            self.durability.lazy_persist(s.raw, out)
            e = self.install_vote(msg, s.sender, s.raw)
            assert e is not None
        self.progress(e, now, out)
        self.execute(now, out)

    def buffer_future(self, s: Signed) -> None:
        """Keep a bounded number of bytes of messages for a view we have not entered yet."""
        q = self.future.setdefault(s.sender, deque())
        q.append(s.raw)
        budget = FUTURE_BYTES
        total = sum(len(r) for r in q)
        while q and (len(q) > FUTURE_PER_SENDER or total > budget):
            total -= len(q.popleft())
            self.ctx.stats["buffer_overflow"] += 1
        self.ctx.stats["buffered"] += 1

    def take_future(self) -> list[bytes]:
        """The buffered messages, oldest sender first, emptying the buffer."""
        buffered, self.future = self.future, {}
        return [raw for q in buffered.values() for raw in q]

    def progress(self, e: Entry, now: float, out: list[Action]) -> None:
        """Advance one entry: prepared -> send COMMIT; committed -> queue for execution."""
        ctx = self.ctx
        cfg = ctx.config
        if e.pp is None or e.seq <= ctx.stable_seq:
            return
        if not e.prepared and len(e.matching(e.prepares)) >= 2 * cfg.f:
            e.prepared = True
            old = self.certs.get(e.seq)
            if old is None or old.view < e.view:
                self.certs[e.seq] = e
        may_vote = self.durability.may_vote(e.view)
        if (
            e.prepared
            and e.view == ctx.view
            and ctx.active
            and ctx.id not in e.commits
            and may_vote
        ):
            raw = ctx.sign(Commit(e.view, e.seq, e.pp.digest))
            e.commits[ctx.id] = (e.pp.digest, raw)
            self.durability.persist(out)
            if not ctx.replaying:
                out.append(Broadcast(raw))
        if e.prepared and not e.committed and len(e.matching(e.commits)) >= cfg.quorum:
            e.committed = True
            if e.seq > ctx.last_executed and e.seq not in self.committed:
                self.committed[e.seq] = CommittedBatch(e.view, e.pp, e.records())

    # --- execution ---------------------------------------------------------

    def execute(self, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        executed = False
        while ctx.last_executed + 1 in self.committed:
            seq = ctx.last_executed + 1
            batch = self.committed.pop(seq)
            replies: list[tuple[int, int, bytes]] = []
            for raw, rd in zip(batch.pp.requests, batch.pp.request_digests, strict=True):
                self.execute_one(seq, batch.view, raw, rd, out, replies)
            self.reply_batch(replies, out)
            if not ctx.replaying:
                out.append(Committed(seq, batch.view, batch.pp.digest))
            ctx.last_executed = seq
            executed = True
            if seq % ctx.config.checkpoint_interval == 0:
                self.host.take_checkpoint(seq, now, out)
        if executed:
            ctx.backoff = 0
            if ctx.active:
                ctx.vc_deadline = now + ctx.timeout() if self.pending else None
            self.propose(now, out)

    def remember_request(self, rd: bytes, client: int, msg: Request) -> None:
        parsed = self.parsed
        if len(parsed) >= PARSED_MAX:
            parsed.clear()  # requests that were never executed (bounded, merely re-parsed)
        parsed[rd] = (client, msg)

    def execute_one(
        self,
        seq: int,
        view: int,
        raw: bytes,
        rd: bytes,
        out: list[Action],
        replies: list[tuple[int, int, bytes]],
    ) -> None:
        # rd stays in inflight until the stable checkpoint: a re-sent request then re-sends
        # our votes for its sequence number (see on_request).
        ctx = self.ctx
        parsed = self.parsed.pop(rd, None)
        if parsed is None:
            try:
                r = ctx.codec.decode(raw, limit=ctx.config.max_request_bytes)
            except ProtocolError:
                return
            if not isinstance(r.msg, Request):
                return
            parsed = (r.sender, r.msg)
        c, req = parsed
        ts = req.timestamp
        pending = self.pending.get(c)
        if pending is not None and pending[0] <= ts:
            del self.pending[c]
        last = ctx.clients.get(c)
        if last is not None and ts <= last[0]:
            if ts == last[0]:
                replies.append((c, ts, last[1]))
            return
        client = ctx.config.clients[c].raw
        result = ctx.app.execute(req.op, client)
        ctx.clients[c] = (ts, result)
        if not ctx.replaying:
            out.append(Executed(seq, view, rd, client, ts, result))
        replies.append((c, ts, result))

    # --- what the other parts change ----------------------------------------

    def collect_garbage(self, seq: int) -> None:
        """``seq`` became stable: drop what it covers."""
        self.log = {k: e for k, e in self.log.items() if k[1] > seq}
        self.certs = {n: e for n, e in self.certs.items() if n > seq}
        self.committed = {n: b for n, b in self.committed.items() if n > seq}
        live = {rd for e in self.log.values() if e.pp for rd in e.pp.request_digests}
        self.inflight = {rd: n for rd, n in self.inflight.items() if rd in live}
        self.next_seq = max(self.next_seq, seq + 1)

    def forget_answered(self) -> None:
        """Drop pending requests the reply cache (just replaced by a state transfer) covers."""
        for c, (ts, _) in self.ctx.clients.items():
            p = self.pending.get(c)
            if p is not None and p[0] <= ts:
                del self.pending[c]

    def records(self) -> list[bytes]:
        """Every signed message of the log, certificates and committed batches."""
        records: list[bytes] = []
        seen: set[int] = set()
        for e in list(self.certs.values()) + list(self.log.values()):
            if id(e) not in seen:
                seen.add(id(e))
                records.extend(e.records())
        for b in self.committed.values():
            records.extend(b.records)
        return records
