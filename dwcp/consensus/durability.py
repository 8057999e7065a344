"""When a replica's messages become durable ("write before send", one fsync per request).

The certificate (the PRE-PREPARE and the PREPAREs that complete it) is persisted
before our COMMIT goes out, and our own CHECKPOINTs, VIEW-CHANGEs and NEW-VIEWs
before they are sent. PRE-PREPAREs, PREPAREs, COMMITs and others' CHECKPOINTs are
written lazily, with the next write. So a replica restarted from its log may have
sent a PREPARE (or, as primary, a PRE-PREPARE) it has no record of: it stays silent
in every view up to the one it crashed in (``passive_view``) and votes again from
the next view on. The log is never empty once we may have voted (a "started"
record goes first).
"""

from __future__ import annotations

from dwcp.consensus.actions import Action, Compact, Persist
from dwcp.consensus.context import ReplicaContext
from dwcp.consensus.messages import Status

LAZY_MAX = 512
"""Lazily written records held at most before they are flushed with a write of their own."""
STARTED = b"started"
"""Nonce of the self-signed STATUS that opens every log written by a replica that may vote."""


class Durability:
    """The replica's WAL policy: which records go out as ``Persist`` actions, and when."""

    def __init__(self, ctx: ReplicaContext) -> None:
        self.ctx = ctx
        self.lazy: list[bytes] = []
        # WAL records of a message whose handler raised, written first with the next output.
        self.carried: list[Action] = []
        # Whether the log already holds a record (so the "started" record was written).
        self.durable = False
        # Votes are written lazily (before our COMMIT, not before our PRE-PREPARE/PREPARE),
        # so after a restart from the log we may have voted in the view we crashed in
        # without a record of it: we stay silent in views <= passive_view.
        self.passive_view = -1

    def may_vote(self, view: int) -> bool:
        """Whether we may send a PRE-PREPARE/PREPARE/COMMIT in ``view`` (see passive_view)."""
        return self.ctx.replaying or view > self.passive_view

    def persist(self, out: list[Action], raw: bytes | None = None) -> None:
        """Flush the lazy records, then ``raw``: durable before any later action of ``out``."""
        if self.ctx.replaying:
            return
        if not self.durable:
            # The log must never look empty once we may have voted (an empty log restarts
            # as a fresh replica that never voted).
            self.durable = True
            out.append(Persist(self.ctx.sign(Status(STARTED, 0, 0, 0))))
        for r in self.lazy:
            out.append(Persist(r))
        self.lazy.clear()
        if raw is not None:
            out.append(Persist(raw))

    def lazy_persist(self, raw: bytes, out: list[Action]) -> None:
        """Write ``raw`` with the next write (before our next COMMIT at the latest)."""
        if self.ctx.replaying:
            return
        if not self.durable:
            self.persist(out)
        self.lazy.append(raw)
        if len(self.lazy) >= LAZY_MAX:
            self.persist(out)

    @staticmethod
    def durable_only(out: list[Action], mark: int) -> list[Action]:
        """The Persist/Compact actions of ``out[mark:]``, in order (what must still be written)."""
        return [a for a in out[mark:] if isinstance(a, Persist | Compact)]

    def take_carried(self) -> list[Action]:
        """Records kept from a message whose handler raised, to be written first."""
        out, self.carried = self.carried, []
        return out
