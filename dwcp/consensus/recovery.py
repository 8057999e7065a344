"""Recovery of a replica that lost its log (amnesia).

A replica started with ``recovering=True`` persists a marker, asks every replica
for its status and, once 2f+1 others answered, refuses to vote until it has
state-transferred to a stable checkpoint at or beyond ``max(reported last
executed) + L``: every sequence number it could have voted on before losing its
log lies below that point, so it can never contradict an earlier vote. It then
joins the highest reported view through a VIEW-CHANGE with an empty prepared set
(valid: it holds no certificates above its checkpoint), and replicas already in
that view answer with their NEW-VIEW. The marker records the safe point once
known, so a crash during recovery resumes it instead of starting over as a
replica that never voted.
"""

from __future__ import annotations

from typing import Protocol

from dwcp.consensus.actions import Action, Broadcast, Persist, Recovered, Send
from dwcp.consensus.checkpoints import Checkpoints
from dwcp.consensus.context import ReplicaContext
from dwcp.consensus.durability import Durability
from dwcp.consensus.messages import Signed, Status, StatusQuery, digest
from dwcp.consensus.views import ViewChanges

RECOVERING = b"recovering"
"""Nonce of the self-signed STATUS that marks a log as belonging to a recovering replica."""


class RecoveryHost(Protocol):
    """What recovery asks of the rest of the replica."""

    def compact(self, out: list[Action]) -> None:
        """Rewrite the log to what is still live (the marker is gone once recovered)."""


class Recovery:
    """The status round and the safe point of a replica recovering from a lost log."""

    def __init__(
        self,
        ctx: ReplicaContext,
        durability: Durability,
        checkpoints: Checkpoints,
        views: ViewChanges,
        host: RecoveryHost,
    ) -> None:
        self.ctx = ctx
        self.durability = durability
        self.checkpoints = checkpoints
        self.views = views
        self.host = host
        self.marker = b""
        self.nonce = b""
        self.statuses: dict[int, Status] = {}
        self.safe_seq: int | None = None
        self.safe_view = 0
        self.status_deadline: float | None = 0.0 if ctx.recovering else None

    def deadline(self) -> float | None:
        return self.status_deadline if self.ctx.recovering else None

    def tick(self, now: float, out: list[Action]) -> None:
        if self.ctx.recovering and self.status_deadline is not None and now >= self.status_deadline:
            self.query_status(now, out)

    def replayed_marker(self, msg: Status, raw: bytes) -> None:
        """Our own marker found in the log: we crashed while recovering, resume."""
        self.ctx.recovering, self.marker = True, raw
        if msg.last_executed:
            self.safe_seq, self.safe_view = msg.last_executed, msg.view

    def resume(self, now: float, out: list[Action]) -> None:
        """After replaying the log: make the marker durable first, then query at once."""
        if not self.marker:
            # Durable first: a crash before recovery ends must not restart as a fresh replica.
            self.marker = self.ctx.sign(Status(RECOVERING, 0, 0, 0))
            out.insert(0, Persist(self.marker))
        self.status_deadline = now

    def query_status(self, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if not self.marker:
            self.marker = ctx.sign(Status(RECOVERING, 0, 0, 0))
            self.durability.persist(out, self.marker)
        if self.safe_seq is None:
            self.nonce = digest(repr((ctx.id, now, ctx.stats["status_queries"])).encode())
            ctx.stats["status_queries"] += 1
            self.statuses = {}
            out.append(Broadcast(ctx.sign(StatusQuery(self.nonce))))
        self.status_deadline = now + ctx.config.view_change_timeout

    def on_status_query(self, s: Signed, msg: StatusQuery, out: list[Action]) -> None:
        ctx = self.ctx
        ctx.codec.verify(s)
        last = max(ctx.last_executed, self.checkpoints.own_checkpoint_seq)
        reply = Status(msg.nonce, ctx.view, last, ctx.stable_seq)
        out.append(Send(s.sender, ctx.sign(reply)))

    def on_status(self, s: Signed, msg: Status, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if not ctx.recovering or self.safe_seq is not None or msg.nonce != self.nonce:
            ctx.stats["stale_status"] += 1
            return
        ctx.codec.verify(s)
        self.statuses[s.sender] = msg
        if len(self.statuses) < ctx.config.quorum:
            return
        window = ctx.config.watermark_window
        self.safe_seq = max(st.last_executed for st in self.statuses.values()) + window
        self.safe_view = max(st.view for st in self.statuses.values())
        self.marker = ctx.sign(Status(RECOVERING, self.safe_view, self.safe_seq, 0))
        self.durability.persist(out, self.marker)
        self.maybe_finish(now, out)

    def maybe_finish(self, now: float, out: list[Action]) -> None:
        """Vote again once the stable checkpoint reached the safe point."""
        ctx = self.ctx
        if self.safe_seq is None or ctx.stable_seq < self.safe_seq:
            return
        ctx.recovering = False
        self.marker = b""
        self.status_deadline = None
        ctx.stats["recovered"] += 1
        out.append(Recovered(ctx.stable_seq, self.safe_view))
        if self.safe_view == 0:
            ctx.view, ctx.active = 0, True
            self.host.compact(out)
        else:
            ctx.view = self.safe_view - 1
            self.views.start_view_change(self.safe_view, now, out)
            self.host.compact(out)
