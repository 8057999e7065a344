"""Sans-IO PBFT replica (Castro & Liskov): fed bytes and ``now``, returns actions.

``Replica`` is a facade: it decodes and dispatches messages, fires timers and
replays the write-ahead log, and wires together the parts that hold the protocol:

- ``normal.NormalCase``: requests, PRE-PREPARE / PREPARE / COMMIT, execution;
- ``checkpoints.Checkpoints``: checkpoints, garbage collection, state transfer;
- ``views.ViewChanges``: VIEW-CHANGE / NEW-VIEW (``viewchange`` holds their checks);
- ``recovery.Recovery``: rejoining after a lost log (amnesia);
- ``durability.Durability``: which records are durable before which sends.

They share one ``context.ReplicaContext`` (identity, view, execution point) and
ask each other for what they do not own through the facade (the ``*Host``
protocols of their modules), so no part imports a part that imports it.

Durability ("write before send"), one fsync stage per request: see
``durability``. Recovery from the log installs its records (the self-signed
STATE record a compacted log starts with, then what is still live) and
re-derives our own PREPAREs/COMMITs (Ed25519 is deterministic, so they are the
same bytes we may already have sent).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from dwcp.consensus.actions import Action, Compact
from dwcp.consensus.app import StateMachine
from dwcp.consensus.checkpoints import Checkpoints
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.context import ReplicaContext
from dwcp.consensus.durability import Durability
from dwcp.consensus.messages import (
    Checkpoint,
    Codec,
    Commit,
    FetchState,
    Kind,
    NewView,
    Prepare,
    PrePrepare,
    Request,
    Signed,
    State,
    Status,
    StatusQuery,
    ViewChange,
)
from dwcp.consensus.normal import NormalCase
from dwcp.consensus.recovery import RECOVERING, Recovery
from dwcp.consensus.views import ViewChanges
from dwcp.errors import AuthenticationError, ConfigError, ProtocolError, WalError
from dwcp.identity import NodeKey

WAL_LIMIT = 1 << 31
"""Largest record accepted from the write-ahead log (a compacted log's STATE can be big)."""


class Replica:
    """One PBFT replica; see the module docstring for how its parts fit together."""

    def __init__(
        self,
        config: ClusterConfig,
        replica_id: int,
        key: NodeKey,
        app: StateMachine,
        *,
        recovering: bool = False,
    ) -> None:
        if not 0 <= replica_id < config.n or config.replicas[replica_id] != key.public:
            raise ConfigError("replica_id does not match this key in ClusterConfig.replicas")
        self.ctx = ReplicaContext(config, replica_id, key, app, recovering=recovering)
        wiring = _Wiring(self)
        self.durability = Durability(self.ctx)
        self.normal = NormalCase(self.ctx, self.durability, wiring)
        self.checkpoints = Checkpoints(self.ctx, self.durability, self.normal, wiring)
        self.views = ViewChanges(self.ctx, self.durability, self.normal, self.checkpoints, wiring)
        self.recovery = Recovery(self.ctx, self.durability, self.checkpoints, self.views, wiring)

    # --- public API --------------------------------------------------------

    @property
    def config(self) -> ClusterConfig:
        return self.ctx.config

    @property
    def id(self) -> int:
        return self.ctx.id

    @property
    def key(self) -> NodeKey:
        return self.ctx.key

    @property
    def app(self) -> StateMachine:
        return self.ctx.app

    @property
    def codec(self) -> Codec:
        return self.ctx.codec

    @property
    def stats(self) -> Counter[str]:
        return self.ctx.stats

    @property
    def view(self) -> int:
        return self.ctx.view

    @property
    def active(self) -> bool:
        """False between starting a view change and entering the new view."""
        return self.ctx.active

    @property
    def last_executed(self) -> int:
        return self.ctx.last_executed

    @property
    def stable_seq(self) -> int:
        return self.ctx.stable_seq

    @property
    def recovering(self) -> bool:
        """Recovering from a lost log: the replica does not vote yet."""
        return self.ctx.recovering

    @property
    def is_primary(self) -> bool:
        return self.ctx.is_primary

    @property
    def log_size(self) -> int:
        """Entries held in the log (bounded by the watermark window)."""
        return len(self.normal.log)

    def receive(self, data: bytes, now: float) -> list[Action]:
        """Handle one encoded message; invalid input is dropped and counted in ``stats``.

        A bug raised while handling it propagates (the simulator must see it), but the WAL
        records it had already taken from the lazy queue are kept for the next output.
        """
        out = self.durability.take_carried()
        mark = len(out)
        try:
            self._handle(data, now, out)
        except Exception:
            self.durability.carried = self.durability.durable_only(out, mark)
            raise
        return out

    def receive_batch(self, datas: Iterable[bytes], now: float) -> list[Action]:
        """``receive`` each message in turn, then propose once: what arrived together
        (a driver's event-loop turn) shares a PRE-PREPARE instead of the first request
        going alone. Same result as ``receive`` one by one, apart from batch boundaries."""
        out = self.durability.take_carried()
        normal = self.normal
        normal.hold_proposals = True
        try:
            for data in datas:
                mark = len(out)
                try:
                    self._handle(data, now, out)
                except Exception:
                    # A bug on one input must not drop the WAL records among its actions
                    # (earlier messages' lazy records may have moved there): count it,
                    # keep those and the other messages' actions.
                    out[mark:] = self.durability.durable_only(out, mark)
                    self.stats["internal_errors"] += 1
        finally:
            normal.hold_proposals = False
        if normal.proposal_held:
            normal.proposal_held = False
            normal.propose(now, out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Fire due timers: view-change timeouts, retransmissions, state fetch, recovery."""
        out = self.durability.take_carried()
        self.recovery.tick(now, out)
        self.views.tick(now, out)
        self.checkpoints.tick(now, out)
        return out

    def next_deadline(self) -> float | None:
        times = [
            t
            for t in (
                self.ctx.vc_deadline,
                self.views.vc_resend,
                self.checkpoints.fetch_deadline,
                self.recovery.deadline(),
            )
            if t is not None
        ]
        return min(times, default=None)

    def recover(self, records: Iterable[bytes], now: float) -> list[Action]:
        """Rebuild the state from the write-ahead log (call once, before anything else)."""
        ctx, normal, cps, views = self.ctx, self.normal, self.checkpoints, self.views
        out: list[Action] = []
        nv_view, nv_raw, vc_view = -1, b"", -1
        records = list(records)
        ctx.replaying = True
        try:
            for raw in records:
                try:
                    s = self.codec.decode(raw, limit=WAL_LIMIT)
                except ProtocolError as exc:
                    raise WalError(
                        f"write-ahead log record is not a message of this cluster ({exc}); "
                        "restart the replica with recovering=True and without this log"
                    ) from exc
                msg = s.msg
                if isinstance(msg, State):
                    cps.install_state(msg, [])
                elif isinstance(msg, PrePrepare):
                    normal.install_pp(msg, raw, s.sender)
                elif isinstance(msg, Prepare | Commit):
                    normal.install_vote(msg, s.sender, raw)
                elif isinstance(msg, Checkpoint):
                    cps.store_checkpoint(msg, s.sender, raw)
                    if s.sender == ctx.id:
                        cps.own_checkpoint_seq = max(cps.own_checkpoint_seq, msg.seq)
                elif isinstance(msg, ViewChange) and s.sender == ctx.id and msg.view > vc_view:
                    vc_view, views.own_vc = msg.view, raw
                elif isinstance(msg, NewView) and msg.view > nv_view:
                    nv_view, nv_raw = msg.view, raw
                    for pp_raw in msg.pre_prepares:
                        p = self.codec.decode(pp_raw, limit=WAL_LIMIT)
                        assert isinstance(p.msg, PrePrepare)
                        normal.install_pp(p.msg, pp_raw, p.sender)
                elif isinstance(msg, Status) and s.sender == ctx.id and msg.nonce == RECOVERING:
                    self.recovery.replayed_marker(msg, raw)
            if records and not ctx.recovering:
                self.durability.durable = True
                self.durability.passive_view = max(nv_view, 0)
                self.stats["restarted_passive_in_view"] = self.durability.passive_view
            if vc_view > nv_view:
                ctx.view, ctx.active = vc_view, False
            elif nv_view >= 0:
                ctx.view, ctx.active, views.nv_raw = nv_view, True, nv_raw
                views.own_vc = b""
            for key in sorted(normal.log):
                e = normal.log[key]
                normal.progress(e, now, [])
            normal.execute(now, [])
        finally:
            ctx.replaying = False
        normal.next_seq = max(normal.next_seq, ctx.last_executed + 1)
        normal.inflight = {
            rd: e.seq
            for e in normal.log.values()
            if e.pp is not None and e.view == ctx.view and e.seq > ctx.last_executed
            for rd in e.pp.request_digests
        }
        if views.own_vc and not ctx.active:
            self.codec.decode(views.own_vc, limit=WAL_LIMIT)
            views.resume(now, out)
        if ctx.recovering:
            self.recovery.resume(now, out)
        return out

    # --- dispatch ----------------------------------------------------------

    def _handle(self, data: bytes, now: float, out: list[Action]) -> None:
        """Decode and dispatch one message into ``out``.

        Invalid input (bad signature, protocol violation found part-way) drops the
        message's sends but keeps its WAL records: ``Durability.persist`` may already have
        moved earlier messages' lazily written votes into ``out``, and a later COMMIT relies
        on them being durable (issue 19 item 8).
        """
        try:
            s = self.codec.decode(data)
        except ProtocolError:
            self.stats["malformed"] += 1
            return
        mark = len(out)
        try:
            self._dispatch(s, now, out)
        except AuthenticationError:
            self.stats["bad_signature"] += 1
            out[mark:] = self.durability.durable_only(out, mark)
        except ProtocolError:
            self.stats["invalid"] += 1
            out[mark:] = self.durability.durable_only(out, mark)

    def _dispatch(self, s: Signed, now: float, out: list[Action]) -> None:
        kind = s.kind
        if kind is not Kind.REQUEST and s.sender == self.id:
            self.stats["from_self"] += 1
            return
        if self.recovering and kind not in (Kind.STATUS, Kind.CHECKPOINT, Kind.STATE):
            self.stats["ignored_recovering"] += 1
            return
        msg = s.msg
        if isinstance(msg, Request):
            self.normal.on_request(s, msg, now, out)
        elif isinstance(msg, PrePrepare | Prepare | Commit):
            self.normal.on_normal(s, msg, now, out)
        elif isinstance(msg, Checkpoint):
            self.checkpoints.on_checkpoint(s, msg, now, out)
        elif isinstance(msg, ViewChange):
            self.views.on_view_change(s, msg, now, out)
        elif isinstance(msg, NewView):
            self.views.on_new_view(s, msg, now, out)
        elif isinstance(msg, FetchState):
            self.checkpoints.on_fetch(s, msg, now, out)
        elif isinstance(msg, State):
            self.checkpoints.on_state(s, msg, now, out)
        elif isinstance(msg, StatusQuery):
            self.recovery.on_status_query(s, msg, out)
        elif isinstance(msg, Status):
            self.recovery.on_status(s, msg, now, out)
        else:
            self.stats["unexpected"] += 1

    def _replay_future(self, now: float, out: list[Action]) -> None:
        for raw in self.normal.take_future():
            s = self.codec.decode(raw)
            msg = s.msg
            if isinstance(msg, PrePrepare | Prepare | Commit) and msg.view >= self.view:
                try:
                    self._dispatch(s, now, out)
                except (ProtocolError, AuthenticationError):
                    self.stats["invalid"] += 1

    def _window_moved(self, now: float, out: list[Action]) -> None:
        """After the low watermark moved: propose what waited for room, replay what was early."""
        if self.ctx.replaying:
            return
        self._replay_future(now, out)
        self.normal.propose(now, out)

    def _live_records(self) -> list[bytes]:
        """Everything recovery needs, as signed messages (the log after compaction)."""
        records = [self.checkpoints.base_record()]
        if self.recovery.marker:
            records.append(self.recovery.marker)
        if self.views.nv_raw:
            records.append(self.views.nv_raw)
        records.extend(self.normal.records())
        records.extend(self.checkpoints.records())
        if self.views.own_vc and not self.active:
            records.append(self.views.own_vc)
        return list(dict.fromkeys(records))


class _Wiring:
    """The facade's side of the parts' ``*Host`` protocols: routes each request to the
    part that owns the answer (kept apart so the parts never see the whole replica)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def push_new_view(self, s: Signed, now: float, out: list[Action]) -> None:
        self.replica.views.push_new_view(s, now, out)

    def beyond_window(self, s: Signed, seq: int, now: float, out: list[Action]) -> None:
        self.replica.checkpoints.beyond_window(s, seq, now, out)

    def take_checkpoint(self, seq: int, now: float, out: list[Action]) -> None:
        self.replica.checkpoints.take_checkpoint(seq, now, out)

    def window_moved(self, now: float, out: list[Action]) -> None:
        self.replica._window_moved(now, out)

    def compact(self, out: list[Action]) -> None:
        out.append(Compact(tuple(self.replica._live_records())))

    def state_installed(self, now: float, out: list[Action]) -> None:
        if self.replica.recovering:
            self.replica.recovery.maybe_finish(now, out)

    def replay_future(self, now: float, out: list[Action]) -> None:
        self.replica._replay_future(now, out)
