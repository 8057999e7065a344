"""The PBFT view change: VIEW-CHANGE, NEW-VIEW and entering the new view.

A replica whose request timer fires (or that sees f+1 replicas in a higher view)
sends a VIEW-CHANGE with its stable checkpoint and its prepared certificates; the
new primary collects 2f+1, computes O (``viewchange.plan_new_view``) and sends
the NEW-VIEW; every backup recomputes O from the same VIEW-CHANGEs and rejects a
NEW-VIEW whose O differs. Our VIEW-CHANGE is re-sent until the view is entered,
and a replica stuck in an older view is sent our (self-certifying) NEW-VIEW.
"""

from __future__ import annotations

from typing import Protocol

from dwcp.consensus.actions import Action, Broadcast, Send, ViewChanged
from dwcp.consensus.checkpoints import Checkpoints
from dwcp.consensus.context import ReplicaContext
from dwcp.consensus.durability import Durability
from dwcp.consensus.messages import Kind, NewView, PrePrepare, Signed, ViewChange, digest
from dwcp.consensus.normal import NormalCase
from dwcp.consensus.viewchange import (
    CheckedViewChange,
    NewViewPlan,
    check_checkpoint_proof,
    check_view_change,
    plan_new_view,
)
from dwcp.errors import ProtocolError


class ViewHost(Protocol):
    """What the view change asks of the rest of the replica."""

    def replay_future(self, now: float, out: list[Action]) -> None:
        """Handle the messages buffered for the view just entered."""


class ViewChanges:
    """The VIEW-CHANGEs seen, ours, and the NEW-VIEW of the current view."""

    def __init__(
        self,
        ctx: ReplicaContext,
        durability: Durability,
        normal: NormalCase,
        checkpoints: Checkpoints,
        host: ViewHost,
    ) -> None:
        self.ctx = ctx
        self.durability = durability
        self.normal = normal
        self.checkpoints = checkpoints
        self.host = host
        self.vcs: dict[int, CheckedViewChange] = {}
        self.own_vc = b""
        self.nv_raw = b""
        self.vc_resend: float | None = None
        self.pushed: dict[int, tuple[int, float]] = {}

    def tick(self, now: float, out: list[Action]) -> None:
        """The request timer (move to the next view) and our VIEW-CHANGE's re-send."""
        ctx = self.ctx
        if ctx.vc_deadline is not None and now >= ctx.vc_deadline:
            ctx.vc_deadline = None
            ctx.stats["view_change_timeouts"] += 1
            if not ctx.recovering:
                self.start_view_change(ctx.view + 1, now, out)
        if self.vc_resend is not None and now >= self.vc_resend:
            self.vc_resend = None
            if not ctx.active and self.own_vc:
                out.append(Broadcast(self.own_vc))
                self.vc_resend = now + ctx.resend_interval()

    def resume(self, now: float, out: list[Action]) -> None:
        """After a restart in the middle of a view change: re-send our VIEW-CHANGE."""
        ctx = self.ctx
        if self.own_vc and not ctx.active:
            self.vcs[ctx.id] = check_view_change(ctx.codec, self.own_vc)
            out.append(Broadcast(self.own_vc))
            self.vc_resend = now + ctx.resend_interval()

    def start_view_change(self, view: int, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if view < ctx.view or (view == ctx.view and not ctx.active):
            return
        ctx.view, ctx.active = view, False
        self.nv_raw = b""
        ctx.backoff += 1
        ctx.stats["view_changes_started"] += 1
        certs = tuple(
            e.cert(ctx.config.primary(e.view), 2 * ctx.config.f)
            for n, e in sorted(self.normal.certs.items())
            if n > ctx.stable_seq
        )
        proof = self.checkpoints.stable_proof
        vc = ViewChange(view, ctx.stable_seq, proof, certs)
        raw = ctx.sign(vc)
        self.durability.persist(out, raw)
        out.append(Broadcast(raw))
        self.own_vc = raw
        prepared = {
            e.seq: e.pp for e in self.normal.certs.values() if e.pp and e.seq > ctx.stable_seq
        }
        d = check_checkpoint_proof(ctx.codec, ctx.stable_seq, proof)
        self.vcs[ctx.id] = CheckedViewChange(ctx.id, raw, vc, d, prepared)
        ctx.vc_deadline = None
        self.vc_resend = now + ctx.resend_interval()
        self.check_quorum(now, out)

    def push_new_view(self, s: Signed, now: float, out: list[Action]) -> None:
        """Help a replica stuck in an older view by forwarding our (self-certifying) NEW-VIEW."""
        ctx = self.ctx
        if not (ctx.active and self.nv_raw) or ctx.replaying:
            return
        sender = s.sender
        last = self.pushed.get(sender)
        if last is not None and last[0] == ctx.view and now - last[1] < ctx.timeout():
            return
        ctx.codec.verify(s)  # a spoofed old message must not make us send a large NEW-VIEW
        self.pushed[sender] = (ctx.view, now)
        out.append(Send(sender, self.nv_raw))

    def on_view_change(self, s: Signed, msg: ViewChange, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if msg.view < ctx.view or (msg.view == ctx.view and ctx.active):
            ctx.stats["old_view"] += 1
            self.push_new_view(s, now, out)
            return
        known = self.vcs.get(s.sender)
        if known is not None and known.msg.view >= msg.view:
            ctx.stats["duplicate"] += 1
            return
        checked = check_view_change(ctx.codec, s.raw)
        self.vcs[s.sender] = checked
        higher = sorted(v.msg.view for v in self.vcs.values() if v.msg.view > ctx.view)
        if len(higher) >= ctx.config.weak_quorum:
            self.start_view_change(higher[0], now, out)
        elif msg.view == ctx.view and not ctx.active:
            self.check_quorum(now, out)

    def check_quorum(self, now: float, out: list[Action]) -> None:
        """2f+1 VIEW-CHANGEs for our view: arm the timer; as its primary, send the NEW-VIEW."""
        ctx = self.ctx
        vcs = sorted(
            (v for v in self.vcs.values() if v.msg.view == ctx.view),
            key=lambda v: (v.sender != ctx.id, v.sender),
        )
        if len(vcs) < ctx.config.quorum or ctx.active:
            return
        if ctx.vc_deadline is None:
            ctx.vc_deadline = now + ctx.timeout()
        if ctx.is_primary:
            chosen = vcs[: ctx.config.quorum]
            plan = plan_new_view(ctx.config, chosen)
            pps = [PrePrepare(ctx.view, seq, reqs) for seq, reqs in plan.batches]
            raws = tuple(ctx.sign(pp) for pp in pps)
            nv = NewView(ctx.view, tuple(v.raw for v in chosen), raws)
            raw = ctx.sign(nv)
            self.durability.persist(out, raw)
            out.append(Broadcast(raw))
            self.enter_view(plan, list(zip(pps, raws, strict=True)), raw, now, out)

    def on_new_view(self, s: Signed, msg: NewView, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if msg.view < ctx.view or (msg.view == ctx.view and ctx.active):
            ctx.stats["old_view"] += 1
            return
        if s.sender != ctx.config.primary(msg.view):
            ctx.stats["not_primary"] += 1
            return
        ctx.codec.verify(s)
        vcs = [check_view_change(ctx.codec, raw) for raw in msg.view_changes]
        if any(v.msg.view != msg.view for v in vcs):
            raise ProtocolError("NEW-VIEW holds VIEW-CHANGEs for another view")
        plan = plan_new_view(ctx.config, vcs)
        if len(plan.batches) != len(msg.pre_prepares):
            ctx.stats["bogus_new_view"] += 1
            raise ProtocolError("NEW-VIEW's O does not match its VIEW-CHANGEs")
        pps: list[tuple[PrePrepare, bytes]] = []
        for raw, (seq, reqs) in zip(msg.pre_prepares, plan.batches, strict=True):
            p = ctx.codec.open(raw, Kind.PRE_PREPARE)
            pp = p.msg
            assert isinstance(pp, PrePrepare)
            if (p.sender, pp.view, pp.seq, pp.requests) != (s.sender, msg.view, seq, reqs):
                ctx.stats["bogus_new_view"] += 1
                raise ProtocolError("NEW-VIEW's O does not match its VIEW-CHANGEs")
            pps.append((pp, raw))
        self.durability.persist(out, s.raw)
        ctx.view = msg.view
        self.enter_view(plan, pps, s.raw, now, out)

    def enter_view(
        self,
        plan: NewViewPlan,
        pps: list[tuple[PrePrepare, bytes]],
        nv_raw: bytes,
        now: float,
        out: list[Action],
    ) -> None:
        ctx, normal, cps = self.ctx, self.normal, self.checkpoints
        ctx.active = True
        self.nv_raw, self.own_vc = nv_raw, b""
        self.vc_resend = None
        ctx.vc_deadline = None
        normal.log = {k: e for k, e in normal.log.items() if k[0] >= ctx.view}
        normal.inflight = {
            rd: n for n, b in normal.committed.items() for rd in b.pp.request_digests
        }
        if plan.min_s > ctx.stable_seq and plan.checkpoint_digest is not None:
            blob = cps.own_blobs.get(plan.min_s)
            if plan.min_s <= ctx.last_executed and blob and digest(blob) == plan.checkpoint_digest:
                cps.make_stable(plan.min_s, plan.checkpoint_proof, blob, out)
            elif plan.min_s > ctx.last_executed:
                signers = []
                for raw in plan.checkpoint_proof:
                    signers.append(ctx.codec.decode(raw).sender)
                cps.start_fetch(plan.min_s, [x for x in signers if x != ctx.id], now, out)
        top = plan.min_s
        for pp, raw in pps:
            top = max(top, pp.seq)
            if not ctx.window(pp.seq):
                continue
            e = normal.install_pp(pp, raw, ctx.config.primary(pp.view))
            own = None if e is None else e.prepares.get(ctx.id)
            if own is not None and not ctx.is_primary:
                out.append(Broadcast(own[1]))
        normal.next_seq = max(top, ctx.stable_seq, ctx.last_executed) + 1
        ctx.stats["views_entered"] += 1
        out.append(ViewChanged(ctx.view, ctx.config.primary(ctx.view)))
        for e in list(normal.log.values()):
            if e.view == ctx.view:
                normal.progress(e, now, out)
        normal.execute(now, out)
        if normal.pending:
            ctx.vc_deadline = now + ctx.timeout()
        self.host.replay_future(now, out)
        normal.propose(now, out)
