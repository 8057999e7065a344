"""Sans-IO PBFT replica (Castro & Liskov): fed bytes and ``now``, returns actions.

Normal case: the primary batches pending requests into PRE-PREPAREs (at most
``max_inflight`` unexecuted); backups PREPARE; 2f PREPAREs from distinct
backups plus the PRE-PREPARE make a request *prepared* (a PREPARE from the
primary is ignored); 2f+1 COMMITs make it *committed*; batches execute in
sequence order. Every K sequence numbers replicas exchange CHECKPOINTs; 2f+1
matching ones make it stable, move the watermarks and garbage-collect the log.

Durability ("write before send"), one fsync stage per request: the certificate
(the PRE-PREPARE and the PREPAREs that complete it) is persisted before our
COMMIT goes out, and our own CHECKPOINTs, VIEW-CHANGEs and NEW-VIEWs before they
are sent. PRE-PREPAREs (ours and received), PREPAREs, COMMITs and others'
CHECKPOINTs are written lazily, with the next write. So a replica restarted from
its log may have sent a PREPARE (or, as primary, a PRE-PREPARE) it has no record
of: it stays silent (no PRE-PREPARE/PREPARE/COMMIT) in every view up to the one
it crashed in, and votes again from the next view on. Safety only needs the
certificates of replicas that sent a COMMIT, and those are durable. The log is
never empty once we may have voted (a "started" record goes first). On a stable
checkpoint the log is compacted to a self-signed STATE record (snapshot + proof)
plus what is still live. Recovery installs those records and re-derives our own
PREPAREs/COMMITs (Ed25519 is deterministic, so they are the same bytes we may
already have sent).

Lost log (amnesia): a replica started with ``recovering=True`` persists a marker,
asks every replica for its status and, once 2f+1 others answered, refuses to
vote until it has state-transferred to a stable checkpoint at or beyond
``max(reported last executed) + L``: every sequence number it could have voted
on before losing its log lies below that point, so it can never contradict an
earlier vote. It then joins the highest reported view through a VIEW-CHANGE
with an empty prepared set (valid: it holds no certificates above its
checkpoint), and replicas already in that view answer with their NEW-VIEW.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from dwcp.consensus.actions import (
    Action,
    Broadcast,
    Committed,
    Compact,
    Executed,
    Persist,
    Recovered,
    ReplyTo,
    Send,
    StateTransferred,
    ViewChanged,
)
from dwcp.consensus.app import StateMachine
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.log import CommittedBatch, Entry, decode_state, encode_state
from dwcp.consensus.messages import (
    Checkpoint,
    Codec,
    Commit,
    FetchState,
    Kind,
    Message,
    NewView,
    Prepare,
    PrePrepare,
    Replies,
    Reply,
    Request,
    Signed,
    State,
    Status,
    StatusQuery,
    ViewChange,
    digest,
)
from dwcp.consensus.viewchange import (
    CheckedViewChange,
    NewViewPlan,
    check_checkpoint_proof,
    check_view_change,
    plan_new_view,
)
from dwcp.errors import AuthenticationError, ConfigError, ProtocolError, WalError
from dwcp.identity import NodeKey

_FUTURE_PER_SENDER = 256
_FUTURE_BYTES = 4 << 20
_LAZY_MAX = 512
_PARSED_MAX = 1024
"""Parsed requests kept for execution (each at most max_request_bytes)."""
_REPLIES_BYTES = 32 << 10
"""Result bytes per REPLIES message (a batch's replies are split above this)."""
_RECOVERING = b"recovering"
_STARTED = b"started"
_WAL_LIMIT = 1 << 31


class Replica:
    """One PBFT replica; see the module docstring for the protocol and durability rules."""

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
        self.config = config
        self.id = replica_id
        self.key = key
        self.app = app
        self.codec = Codec(config)
        self.stats: Counter[str] = Counter()
        self.view = 0
        self.active = True
        self.last_executed = 0
        self.stable_seq = 0
        self._stable_proof: tuple[bytes, ...] = ()
        self._clients: dict[int, tuple[int, bytes]] = {}
        self._stable_blob = encode_state(app.snapshot(), self._clients)
        self._log: dict[tuple[int, int], Entry] = {}
        self._certs: dict[int, Entry] = {}
        self._committed: dict[int, CommittedBatch] = {}
        self._next_seq = 1
        self._pending: dict[int, tuple[int, bytes, bytes]] = {}
        self._inflight: dict[bytes, int] = {}
        self._checkpoints: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        self._far: dict[int, tuple[int, bytes, bytes]] = {}
        self._own_blobs: dict[int, bytes] = {}
        self._own_checkpoint_seq = 0
        self._vcs: dict[int, CheckedViewChange] = {}
        self._own_vc = b""
        self._nv_raw = b""
        self._future: dict[int, deque[bytes]] = {}
        self._lazy: list[bytes] = []
        self._carried: list[Action] = []  # WAL records of a message whose handler raised
        self._vc_deadline: float | None = None
        self._vc_resend: float | None = None
        self._backoff = 0
        self._fetch_seq = 0
        self._fetch_deadline: float | None = None
        self._pushed: dict[int, tuple[int, float]] = {}
        self._served: dict[int, tuple[int, float]] = {}
        self._ahead: dict[int, int] = {}
        self._replaying = False
        # Requests verified on arrival, by digest, so execution does not parse them again.
        self._parsed: dict[bytes, tuple[int, Request]] = {}
        self._hold_proposals = False
        self._proposal_held = False
        # Votes are written lazily (before our COMMIT, not before our PRE-PREPARE/PREPARE),
        # so after a restart from the log we may have voted in the view we crashed in
        # without a record of it: we stay silent in views <= _passive_view.
        self._passive_view = -1
        self._durable = False
        # Recovery after a lost log.
        self.recovering = recovering
        self._marker = b""
        self._nonce = b""
        self._statuses: dict[int, Status] = {}
        self._safe_seq: int | None = None
        self._safe_view = 0
        self._status_deadline: float | None = 0.0 if recovering else None

    # --- public API --------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self.config.primary(self.view) == self.id

    @property
    def log_size(self) -> int:
        """Entries held in the log (bounded by the watermark window)."""
        return len(self._log)

    def receive(self, data: bytes, now: float) -> list[Action]:
        """Handle one encoded message; invalid input is dropped and counted in ``stats``.

        A bug raised while handling it propagates (the simulator must see it), but the WAL
        records it had already taken from the lazy queue are kept for the next output.
        """
        out = self._take_carried()
        mark = len(out)
        try:
            self._handle(data, now, out)
        except Exception:
            self._carried = self._durable_only(out, mark)
            raise
        return out

    def receive_batch(self, datas: Iterable[bytes], now: float) -> list[Action]:
        """``receive`` each message in turn, then propose once: what arrived together
        (a driver's event-loop turn) shares a PRE-PREPARE instead of the first request
        going alone. Same result as ``receive`` one by one, apart from batch boundaries."""
        out = self._take_carried()
        self._hold_proposals = True
        try:
            for data in datas:
                mark = len(out)
                try:
                    self._handle(data, now, out)
                except Exception:
                    # A bug on one input must not drop the WAL records among its actions
                    # (earlier messages' lazy records may have moved there): count it,
                    # keep those and the other messages' actions.
                    out[mark:] = self._durable_only(out, mark)
                    self.stats["internal_errors"] += 1
        finally:
            self._hold_proposals = False
        if self._proposal_held:
            self._proposal_held = False
            self._propose(now, out)
        return out

    def _handle(self, data: bytes, now: float, out: list[Action]) -> None:
        """Decode and dispatch one message into ``out``.

        Invalid input (bad signature, protocol violation found part-way) drops the
        message's sends but keeps its WAL records: ``_persist`` may already have moved
        earlier messages' lazily written votes into ``out``, and a later COMMIT relies on
        them being durable (issue 19 item 8).
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
            out[mark:] = self._durable_only(out, mark)
        except ProtocolError:
            self.stats["invalid"] += 1
            out[mark:] = self._durable_only(out, mark)

    @staticmethod
    def _durable_only(out: list[Action], mark: int) -> list[Action]:
        """The Persist/Compact actions of ``out[mark:]``, in order (what must still be written)."""
        return [a for a in out[mark:] if isinstance(a, Persist | Compact)]

    def _take_carried(self) -> list[Action]:
        """Records kept from a message whose handler raised, to be written first."""
        out, self._carried = self._carried, []
        return out

    def tick(self, now: float) -> list[Action]:
        """Fire due timers: view-change timeouts, retransmissions, state fetch, recovery."""
        out = self._take_carried()
        if self.recovering and self._status_deadline is not None and now >= self._status_deadline:
            self._query_status(now, out)
        if self._vc_deadline is not None and now >= self._vc_deadline:
            self._vc_deadline = None
            self.stats["view_change_timeouts"] += 1
            if not self.recovering:
                self._start_view_change(self.view + 1, now, out)
        if self._vc_resend is not None and now >= self._vc_resend:
            self._vc_resend = None
            if not self.active and self._own_vc:
                out.append(Broadcast(self._own_vc))
                self._vc_resend = now + self._resend_interval()
        if self._fetch_deadline is not None and now >= self._fetch_deadline:
            if self._fetch_seq > self.last_executed:
                raw = self._sign(FetchState(self._fetch_seq))
                out.append(Broadcast(raw))
                self._fetch_deadline = now + self._timeout()
            else:
                self._fetch_deadline = None
        return out

    def next_deadline(self) -> float | None:
        times = [
            t
            for t in (
                self._vc_deadline,
                self._vc_resend,
                self._fetch_deadline,
                self._status_deadline if self.recovering else None,
            )
            if t is not None
        ]
        return min(times, default=None)

    def recover(self, records: Iterable[bytes], now: float) -> list[Action]:
        """Rebuild the state from the write-ahead log (call once, before anything else)."""
        out: list[Action] = []
        nv_view, nv_raw, vc_view = -1, b"", -1
        records = list(records)
        self._replaying = True
        try:
            for raw in records:
                try:
                    s = self.codec.decode(raw, limit=_WAL_LIMIT)
                except ProtocolError as exc:
                    raise WalError(
                        f"write-ahead log record is not a message of this cluster ({exc}); "
                        "restart the replica with recovering=True and without this log"
                    ) from exc
                msg = s.msg
                if isinstance(msg, State):
                    self._install_state(msg, [])
                elif isinstance(msg, PrePrepare):
                    self._install_pp(msg, raw, s.sender)
                elif isinstance(msg, Prepare | Commit):
                    self._install_vote(msg, s.sender, raw)
                elif isinstance(msg, Checkpoint):
                    self._store_checkpoint(msg, s.sender, raw)
                    if s.sender == self.id:
                        self._own_checkpoint_seq = max(self._own_checkpoint_seq, msg.seq)
                elif isinstance(msg, ViewChange) and s.sender == self.id and msg.view > vc_view:
                    vc_view, self._own_vc = msg.view, raw
                elif isinstance(msg, NewView) and msg.view > nv_view:
                    nv_view, nv_raw = msg.view, raw
                    for pp_raw in msg.pre_prepares:
                        p = self.codec.decode(pp_raw, limit=_WAL_LIMIT)
                        assert isinstance(p.msg, PrePrepare)
                        self._install_pp(p.msg, pp_raw, p.sender)
                elif isinstance(msg, Status) and s.sender == self.id and msg.nonce == _RECOVERING:
                    self.recovering, self._marker = True, raw
                    if msg.last_executed:
                        self._safe_seq, self._safe_view = msg.last_executed, msg.view
            if records and not self.recovering:
                self._durable = True
                self._passive_view = max(nv_view, 0)
                self.stats["restarted_passive_in_view"] = self._passive_view
            if vc_view > nv_view:
                self.view, self.active = vc_view, False
            elif nv_view >= 0:
                self.view, self.active, self._nv_raw = nv_view, True, nv_raw
                self._own_vc = b""
            for key in sorted(self._log):
                e = self._log[key]
                self._progress(e, now, [])
            self._execute(now, [])
        finally:
            self._replaying = False
        self._next_seq = max(self._next_seq, self.last_executed + 1)
        self._inflight = {
            rd: e.seq
            for e in self._log.values()
            if e.pp is not None and e.view == self.view and e.seq > self.last_executed
            for rd in e.pp.request_digests
        }
        if self._own_vc and not self.active:
            vc = self.codec.decode(self._own_vc, limit=_WAL_LIMIT)
            self._vcs[self.id] = check_view_change(self.codec, vc.raw)
            out.append(Broadcast(self._own_vc))
            self._vc_resend = now + self._resend_interval()
        if self.recovering:
            if not self._marker:
                # Durable first: a crash before recovery ends must not restart as a fresh replica.
                self._marker = self._sign(Status(_RECOVERING, 0, 0, 0))
                out.insert(0, Persist(self._marker))
            self._status_deadline = now
        return out

    # --- helpers -----------------------------------------------------------

    def _sign(self, msg: Message) -> bytes:
        return self.codec.encode(msg, self.id, self.key)

    def _timeout(self) -> float:
        return self.config.view_change_timeout * float(1 << min(self._backoff, 16))

    def _resend_interval(self) -> float:
        """How often our VIEW-CHANGE is re-sent: well inside the view-change timeout.

        Re-sending only once per timeout meant a single lost VIEW-CHANGE reached the new
        primary at the very moment the others gave the view up (the quorum's timer and the
        re-send fired together), so a 2% drop rate could skip views one after another.
        """
        return min(self._timeout() / 2, self.config.view_change_timeout)

    def _persist(self, out: list[Action], raw: bytes | None = None) -> None:
        if self._replaying:
            return
        if not self._durable:
            # The log must never look empty once we may have voted (an empty log restarts
            # as a fresh replica that never voted).
            self._durable = True
            out.append(Persist(self._sign(Status(_STARTED, 0, 0, 0))))
        for r in self._lazy:
            out.append(Persist(r))
        self._lazy.clear()
        if raw is not None:
            out.append(Persist(raw))

    def _lazy_persist(self, raw: bytes, out: list[Action]) -> None:
        if self._replaying:
            return
        if not self._durable:
            self._persist(out)
        self._lazy.append(raw)
        if len(self._lazy) >= _LAZY_MAX:
            self._persist(out)

    def _window(self, seq: int) -> bool:
        return self.stable_seq < seq <= self.stable_seq + self.config.watermark_window

    def _entry(self, view: int, seq: int) -> Entry:
        e = self._log.get((view, seq))
        if e is None:
            e = self._log[(view, seq)] = Entry(view, seq)
        return e

    # --- dispatch ----------------------------------------------------------

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
            self._on_request(s, msg, now, out)
        elif isinstance(msg, PrePrepare | Prepare | Commit):
            self._on_normal(s, msg, now, out)
        elif isinstance(msg, Checkpoint):
            self._on_checkpoint(s, msg, now, out)
        elif isinstance(msg, ViewChange):
            self._on_view_change(s, msg, now, out)
        elif isinstance(msg, NewView):
            self._on_new_view(s, msg, now, out)
        elif isinstance(msg, FetchState):
            self._on_fetch(s, msg, now, out)
        elif isinstance(msg, State):
            self._on_state(s, msg, now, out)
        elif isinstance(msg, StatusQuery):
            self._on_status_query(s, msg, out)
        elif isinstance(msg, Status):
            self._on_status(s, msg, now, out)
        else:
            self.stats["unexpected"] += 1

    # --- requests ----------------------------------------------------------

    def _reply(self, client: int, ts: int, result: bytes, out: list[Action]) -> None:
        if self._replaying:
            return
        raw = self._sign(Reply(self.view, client, ts, result))
        out.append(ReplyTo(self.config.clients[client].raw, raw))

    def _reply_batch(self, entries: list[tuple[int, int, bytes]], out: list[Action]) -> None:
        """Answer the requests of one executed batch: one signed REPLIES for all of them."""
        if self._replaying or not entries:
            return
        if len(entries) == 1:
            self._reply(*entries[0], out)
            return
        clients = self.config.clients
        start, size = 0, 0
        for i, (_, _, result) in enumerate(entries):
            size += len(result) + 24
            if size > _REPLIES_BYTES or i + 1 == len(entries):
                chunk = entries[start : i + 1]
                raw = self._sign(Replies(self.view, tuple(chunk)))
                for c in dict.fromkeys(c for c, _, _ in chunk):
                    out.append(ReplyTo(clients[c].raw, raw))
                start, size = i + 1, 0

    def _on_request(self, s: Signed, msg: Request, now: float, out: list[Action]) -> None:
        c, ts = s.sender, msg.timestamp
        last = self._clients.get(c)
        if last is not None and ts < last[0]:
            self.stats["stale_request"] += 1
            return
        self.codec.verify(s)
        rd = digest(s.raw)
        self._remember_request(rd, s.sender, msg)
        top = self.stable_seq + self.config.watermark_window
        if last is not None and ts == last[0]:
            # Executed here; the client still waits, so others may lack our votes.
            self.stats["resent_reply"] += 1
            self._reply(c, ts, last[1], out)
            self._retransmit(top, now, out)
            return
        known = self._pending.get(c)
        repeat = known is not None and known[0] == ts
        if known is None or known[0] < ts:
            self._pending[c] = (ts, rd, s.raw)
        elif known[0] > ts:
            self.stats["stale_request"] += 1
            return
        if repeat or not self.is_primary:
            # Clients send to the primary first, so this is a re-sent request: someone is
            # missing messages. Re-send ours for the whole window (each at most once per
            # half client retry): a replica missing any earlier COMMIT cannot execute it.
            self._retransmit(top, now, out)
        if rd in self._inflight:
            pass
        elif self.is_primary:
            self._propose(now, out)
        elif self.active:
            out.append(Send(self.config.primary(self.view), s.raw))
        # Every replica (the primary too) waiting to execute a request runs the timer: a
        # primary that cannot finish its own proposals votes for its replacement.
        if self.active and self._vc_deadline is None:
            self._vc_deadline = now + self._timeout()

    def _retransmit(self, seq: int, now: float, out: list[Action]) -> None:
        """Re-send our PRE-PREPARE/PREPARE/COMMIT of the current view up to ``seq``."""
        if not self.active:
            return
        for n in range(self.stable_seq + 1, seq + 1):
            e = self._log.get((self.view, n))
            if e is None or now - e.resent_at < self.config.client_retry / 2:
                continue
            e.resent_at = now
            self.stats["retransmissions"] += 1
            if self.is_primary and e.pp_raw:
                out.append(Broadcast(e.pp_raw))
            for votes in (e.prepares, e.commits):
                own = votes.get(self.id)
                if own is not None:
                    out.append(Broadcast(own[1]))

    def _propose(self, now: float, out: list[Action]) -> None:
        if not (self.active and self.is_primary) or self.recovering:
            return
        if self._hold_proposals:
            self._proposal_held = True  # receive_batch proposes once, after the last message
            return
        if self.view <= self._passive_view:
            return  # restarted in this view: we may not remember what we proposed
        cfg = self.config
        while self._next_seq - 1 - self.last_executed < cfg.max_inflight and self._window(
            self._next_seq
        ):
            batch = [raw for _, rd, raw in self._pending.values() if rd not in self._inflight]
            if not batch:
                return
            pp = PrePrepare(self.view, self._next_seq, tuple(batch[: cfg.max_batch]))
            raw = self._sign(pp)
            self._lazy_persist(raw, out)  # durable before our COMMIT (see _passive_view)
            out.append(Broadcast(raw))
            self._install_pp(pp, raw, self.id)  # advances _next_seq

    # --- normal case -------------------------------------------------------

    def _install_pp(self, pp: PrePrepare, raw: bytes, sender: int) -> Entry | None:
        if pp.seq <= self.stable_seq:
            return None
        e = self._entry(pp.view, pp.seq)
        if e.pp is not None:
            return None
        e.pp, e.pp_raw = pp, raw
        primary = self.config.primary(pp.view)
        if sender == self.id:
            self._next_seq = max(self._next_seq, pp.seq + 1)
        may_vote = self._replaying or pp.view > self._passive_view
        if primary != self.id and self.id not in e.prepares and may_vote:
            e.prepares[self.id] = (pp.digest, self._sign(Prepare(pp.view, pp.seq, pp.digest)))
        if pp.view == self.view:
            for rd in pp.request_digests:
                self._inflight[rd] = pp.seq
        return e

    def _install_vote(self, msg: Prepare | Commit, sender: int, raw: bytes) -> Entry | None:
        if msg.seq <= self.stable_seq:
            return None
        e = self._entry(msg.view, msg.seq)
        votes = e.prepares if isinstance(msg, Prepare) else e.commits
        if sender not in votes:
            votes[sender] = (msg.digest, raw)
        return e

    def _on_normal(
        self, s: Signed, msg: PrePrepare | Prepare | Commit, now: float, out: list[Action]
    ) -> None:
        # Nothing below reacts to a message (buffer, push, fetch) before its signature verified.
        if msg.view < self.view:
            self.stats["old_view"] += 1
            self._push_new_view(s, now, out)
            return
        if msg.view > self.view or not self.active:
            self.codec.verify(s)
            self._buffer_future(s)
            return
        if not self._window(msg.seq):
            self.stats["out_of_window"] += 1
            high = self.stable_seq + self.config.watermark_window
            if high < msg.seq <= high + self.config.checkpoint_interval:
                # Just past our high watermark: the others saw the checkpoint stable before
                # us. Keep it for when ours is (replayed by _make_stable's callers).
                self.codec.verify(s)
                self._buffer_future(s)
                return
            if msg.seq > self.stable_seq and self._ahead.get(s.sender, -1) < msg.seq:
                self.codec.verify(s)
                self._note_ahead(s.sender, msg.seq, now, out)
            return
        e = self._log.get((msg.view, msg.seq))
        primary = self.config.primary(msg.view)
        if isinstance(msg, PrePrepare):
            if s.sender != primary:
                self.stats["not_primary"] += 1
                return
            if e is not None and e.pp is not None:
                self.stats["duplicate" if e.pp_raw == s.raw else "equivocation"] += 1
                return
            if len(msg.requests) > self.config.max_batch:
                self.stats["oversized_batch"] += 1
                return
            self.codec.verify(s)
            for req, rd in zip(msg.requests, msg.request_digests, strict=True):
                r = self.codec.decode(req, limit=self.config.max_request_bytes)
                if not isinstance(r.msg, Request):
                    raise ProtocolError("a batch may only hold requests")
                self.codec.verify(r)
                self._remember_request(rd, r.sender, r.msg)
            self._lazy_persist(s.raw, out)  # durable before our COMMIT (see _passive_view)
            e = self._install_pp(msg, s.raw, s.sender)
            assert e is not None
            own = e.prepares.get(self.id)
            if own is not None:
                out.append(Broadcast(own[1]))
        else:
            if isinstance(msg, Prepare) and s.sender == primary:
                self.stats["primary_prepare"] += 1
                return
            votes = None if e is None else e.prepares if isinstance(msg, Prepare) else e.commits
            if votes is not None and s.sender in votes:
                self.stats["duplicate"] += 1
                return
            if e is not None and (e.committed if isinstance(msg, Commit) else e.prepared):
                self.stats["late_vote"] += 1
                return
            self.codec.verify(s)
            self._lazy_persist(s.raw, out)
            e = self._install_vote(msg, s.sender, s.raw)
            assert e is not None
        self._progress(e, now, out)
        self._execute(now, out)

    def _buffer_future(self, s: Signed) -> None:
        """Keep a bounded number of bytes of messages for a view we have not entered yet."""
        q = self._future.setdefault(s.sender, deque())
        q.append(s.raw)
        budget = _FUTURE_BYTES
        total = sum(len(r) for r in q)
        while q and (len(q) > _FUTURE_PER_SENDER or total > budget):
            total -= len(q.popleft())
            self.stats["buffer_overflow"] += 1
        self.stats["buffered"] += 1

    def _progress(self, e: Entry, now: float, out: list[Action]) -> None:
        """Advance one entry: prepared -> send COMMIT; committed -> queue for execution."""
        cfg = self.config
        if e.pp is None or e.seq <= self.stable_seq:
            return
        if not e.prepared and len(e.matching(e.prepares)) >= 2 * cfg.f:
            e.prepared = True
            old = self._certs.get(e.seq)
            if old is None or old.view < e.view:
                self._certs[e.seq] = e
        may_vote = self._replaying or e.view > self._passive_view
        if (
            e.prepared
            and e.view == self.view
            and self.active
            and self.id not in e.commits
            and may_vote
        ):
            raw = self._sign(Commit(e.view, e.seq, e.pp.digest))
            e.commits[self.id] = (e.pp.digest, raw)
            self._persist(out)
            if not self._replaying:
                out.append(Broadcast(raw))
        if e.prepared and not e.committed and len(e.matching(e.commits)) >= cfg.quorum:
            e.committed = True
            if e.seq > self.last_executed and e.seq not in self._committed:
                self._committed[e.seq] = CommittedBatch(e.view, e.pp, e.records())

    def _execute(self, now: float, out: list[Action]) -> None:
        executed = False
        while self.last_executed + 1 in self._committed:
            seq = self.last_executed + 1
            batch = self._committed.pop(seq)
            replies: list[tuple[int, int, bytes]] = []
            for raw, rd in zip(batch.pp.requests, batch.pp.request_digests, strict=True):
                self._execute_one(seq, batch.view, raw, rd, out, replies)
            self._reply_batch(replies, out)
            if not self._replaying:
                out.append(Committed(seq, batch.view, batch.pp.digest))
            self.last_executed = seq
            executed = True
            if seq % self.config.checkpoint_interval == 0:
                self._take_checkpoint(seq, now, out)
        if executed:
            self._backoff = 0
            if self.active:
                self._vc_deadline = now + self._timeout() if self._pending else None
            self._propose(now, out)

    def _remember_request(self, rd: bytes, client: int, msg: Request) -> None:
        parsed = self._parsed
        if len(parsed) >= _PARSED_MAX:
            parsed.clear()  # requests that were never executed (bounded, merely re-parsed)
        parsed[rd] = (client, msg)

    def _execute_one(
        self,
        seq: int,
        view: int,
        raw: bytes,
        rd: bytes,
        out: list[Action],
        replies: list[tuple[int, int, bytes]],
    ) -> None:
        # rd stays in _inflight until the stable checkpoint: a re-sent request then re-sends
        # our votes for its sequence number (see _on_request).
        parsed = self._parsed.pop(rd, None)
        if parsed is None:
            try:
                r = self.codec.decode(raw, limit=self.config.max_request_bytes)
            except ProtocolError:
                return
            if not isinstance(r.msg, Request):
                return
            parsed = (r.sender, r.msg)
        c, req = parsed
        ts = req.timestamp
        pending = self._pending.get(c)
        if pending is not None and pending[0] <= ts:
            del self._pending[c]
        last = self._clients.get(c)
        if last is not None and ts <= last[0]:
            if ts == last[0]:
                replies.append((c, ts, last[1]))
            return
        client = self.config.clients[c].raw
        result = self.app.execute(req.op, client)
        self._clients[c] = (ts, result)
        if not self._replaying:
            out.append(Executed(seq, view, rd, client, ts, result))
        replies.append((c, ts, result))

    # --- checkpoints, garbage collection, state transfer ---------------------

    def _take_checkpoint(self, seq: int, now: float, out: list[Action]) -> None:
        blob = encode_state(self.app.snapshot(), self._clients)
        d = digest(blob)
        self._own_blobs[seq] = blob
        self._own_checkpoint_seq = max(self._own_checkpoint_seq, seq)
        raw = self._sign(Checkpoint(seq, d))
        self._persist(out, raw)
        if not self._replaying:
            out.append(Broadcast(raw))
        self._store_checkpoint(Checkpoint(seq, d), self.id, raw)
        self._check_stable(seq, now, out)

    def _store_checkpoint(self, msg: Checkpoint, sender: int, raw: bytes) -> bool:
        if msg.seq <= self.stable_seq:
            return False
        if msg.seq > self.stable_seq + 2 * self.config.watermark_window:
            far = self._far.get(sender)
            if far is not None and far[0] >= msg.seq:
                return False
            self._far[sender] = (msg.seq, msg.digest, raw)
            return True
        votes = self._checkpoints.setdefault(msg.seq, {})
        if sender in votes:
            return False
        votes[sender] = (msg.digest, raw)
        return True

    def _on_checkpoint(self, s: Signed, msg: Checkpoint, now: float, out: list[Action]) -> None:
        if msg.seq <= self.stable_seq or msg.seq % self.config.checkpoint_interval:
            self.stats["old_checkpoint"] += 1
            return
        votes = self._checkpoints.get(msg.seq, {})
        far = self._far.get(s.sender)
        if s.sender in votes or (far is not None and far[0] >= msg.seq):
            self.stats["duplicate"] += 1
            return
        self.codec.verify(s)
        if self._store_checkpoint(msg, s.sender, s.raw):
            self._lazy_persist(s.raw, out)
        self._check_stable(msg.seq, now, out)

    def _check_stable(self, seq: int, now: float, out: list[Action]) -> None:
        votes = self._checkpoints.get(seq)
        if votes is None:
            votes = {s: (d, raw) for s, (q, d, raw) in self._far.items() if q == seq}
        by_digest = Counter(d for d, _ in votes.values())
        if not by_digest:
            return
        d, count = by_digest.most_common(1)[0]
        if count < self.config.quorum:
            return
        proof = tuple(raw for _, (dg, raw) in sorted(votes.items()) if dg == d)
        proof = proof[: self.config.quorum]
        if seq <= self.last_executed:
            blob = self._own_blobs.get(seq)
            if blob is None or digest(blob) != d:
                self.stats["checkpoint_mismatch"] += 1
                return
            self._make_stable(seq, proof, blob, out)
            self._window_moved(now, out)
        else:
            signers = [s for s, (dg, _) in sorted(votes.items()) if dg == d and s != self.id]
            self._start_fetch(seq, signers, now, out)

    def _make_stable(
        self, seq: int, proof: tuple[bytes, ...], blob: bytes, out: list[Action]
    ) -> None:
        if seq <= self.stable_seq:
            return
        self.stable_seq, self._stable_proof, self._stable_blob = seq, proof, blob
        self._log = {k: e for k, e in self._log.items() if k[1] > seq}
        self._certs = {n: e for n, e in self._certs.items() if n > seq}
        self._committed = {n: b for n, b in self._committed.items() if n > seq}
        self._checkpoints = {n: v for n, v in self._checkpoints.items() if n > seq}
        self._far = {s: v for s, v in self._far.items() if v[0] > seq}
        self._own_blobs = {n: b for n, b in self._own_blobs.items() if n >= seq}
        live = {rd for e in self._log.values() if e.pp for rd in e.pp.request_digests}
        self._inflight = {rd: n for rd, n in self._inflight.items() if rd in live}
        self._next_seq = max(self._next_seq, seq + 1)
        self.stats["stable_checkpoints"] += 1
        if not self._replaying:
            self._lazy.clear()
            out.append(Compact(tuple(self._live_records())))

    def _window_moved(self, now: float, out: list[Action]) -> None:
        """After the low watermark moved: propose what waited for room, replay what was early."""
        if self._replaying:
            return
        self._replay_future(now, out)
        self._propose(now, out)

    def _live_records(self) -> list[bytes]:
        """Everything recovery needs, as signed messages (the log after compaction)."""
        base = State(self.stable_seq, self._stable_blob, self._stable_proof)
        records = [self._sign(base)]
        if self._marker:
            records.append(self._marker)
        if self._nv_raw:
            records.append(self._nv_raw)
        seen: set[int] = set()
        for e in list(self._certs.values()) + list(self._log.values()):
            if id(e) not in seen:
                seen.add(id(e))
                records.extend(e.records())
        for b in self._committed.values():
            records.extend(b.records)
        for votes in self._checkpoints.values():
            records.extend(raw for _, raw in votes.values())
        if self._own_vc and not self.active:
            records.append(self._own_vc)
        return list(dict.fromkeys(records))

    def _note_ahead(self, sender: int, seq: int, now: float, out: list[Action]) -> None:
        """f+1 replicas working beyond our high watermark: we fell behind, fetch their state."""
        self._ahead[sender] = seq
        ahead = [s for s, q in sorted(self._ahead.items()) if q > self.stable_seq]
        if len(ahead) >= self.config.weak_quorum and self._fetch_deadline is None:
            self._ahead.clear()
            self._start_fetch(self.last_executed + 1, ahead, now, out)

    def _start_fetch(self, seq: int, signers: list[int], now: float, out: list[Action]) -> None:
        if seq <= self._fetch_seq and self._fetch_deadline is not None:
            return
        self._fetch_seq = max(self._fetch_seq, seq)
        raw = self._sign(FetchState(seq))
        for s in signers[: self.config.weak_quorum]:
            out.append(Send(s, raw))
        self._fetch_deadline = now + self._timeout()
        self.stats["state_fetches"] += 1

    def _on_fetch(self, s: Signed, msg: FetchState, now: float, out: list[Action]) -> None:
        if self.stable_seq == 0 or self.stable_seq < msg.seq:
            self.stats["fetch_unavailable"] += 1
            return
        served = self._served.get(s.sender, (-1, 0.0))
        if served[0] == self.stable_seq and now - served[1] < self._timeout():
            self.stats["fetch_rate_limited"] += 1  # one snapshot per requester per timeout
            return
        self.codec.verify(s)
        self._served[s.sender] = (self.stable_seq, now)
        base = State(self.stable_seq, self._stable_blob, self._stable_proof)
        out.append(Send(s.sender, self._sign(base)))

    def _on_state(self, s: Signed, msg: State, now: float, out: list[Action]) -> None:
        if msg.seq <= self.last_executed:
            self.stats["stale_state"] += 1
            return
        self.codec.verify(s)
        d = check_checkpoint_proof(self.codec, msg.seq, msg.proof)
        if d is None or digest(msg.blob) != d:
            raise ProtocolError("state does not match its checkpoint proof")
        decode_state(msg.blob, len(self.config.clients))
        self._install_state(msg, out)
        self._window_moved(now, out)
        if not self._replaying:
            out.append(StateTransferred(msg.seq))
        self.stats["state_transfers"] += 1
        self._execute(now, out)
        if self.recovering:
            self._maybe_finish_recovery(now, out)

    def _install_state(self, msg: State, out: list[Action]) -> None:
        if msg.seq <= self.last_executed:
            return
        snapshot, clients = decode_state(msg.blob, len(self.config.clients))
        self.app.restore(snapshot)
        self._clients = clients
        self.last_executed = msg.seq
        self._own_blobs[msg.seq] = msg.blob
        for c, (ts, _) in clients.items():
            p = self._pending.get(c)
            if p is not None and p[0] <= ts:
                del self._pending[c]
        if self._fetch_seq <= msg.seq:
            self._fetch_deadline = None
        self._make_stable(msg.seq, msg.proof, msg.blob, out)

    # --- view change -------------------------------------------------------

    def _start_view_change(self, view: int, now: float, out: list[Action]) -> None:
        if view < self.view or (view == self.view and not self.active):
            return
        self.view, self.active = view, False
        self._nv_raw = b""
        self._backoff += 1
        self.stats["view_changes_started"] += 1
        certs = tuple(
            e.cert(self.config.primary(e.view), 2 * self.config.f)
            for n, e in sorted(self._certs.items())
            if n > self.stable_seq
        )
        vc = ViewChange(view, self.stable_seq, self._stable_proof, certs)
        raw = self._sign(vc)
        self._persist(out, raw)
        out.append(Broadcast(raw))
        self._own_vc = raw
        prepared = {e.seq: e.pp for e in self._certs.values() if e.pp and e.seq > self.stable_seq}
        d = check_checkpoint_proof(self.codec, self.stable_seq, self._stable_proof)
        self._vcs[self.id] = CheckedViewChange(self.id, raw, vc, d, prepared)
        self._vc_deadline = None
        self._vc_resend = now + self._resend_interval()
        self._check_view_change_quorum(now, out)

    def _push_new_view(self, s: Signed, now: float, out: list[Action]) -> None:
        """Help a replica stuck in an older view by forwarding our (self-certifying) NEW-VIEW."""
        if not (self.active and self._nv_raw) or self._replaying:
            return
        sender = s.sender
        last = self._pushed.get(sender)
        if last is not None and last[0] == self.view and now - last[1] < self._timeout():
            return
        self.codec.verify(s)  # a spoofed old message must not make us send a large NEW-VIEW
        self._pushed[sender] = (self.view, now)
        out.append(Send(sender, self._nv_raw))

    def _on_view_change(self, s: Signed, msg: ViewChange, now: float, out: list[Action]) -> None:
        if msg.view < self.view or (msg.view == self.view and self.active):
            self.stats["old_view"] += 1
            self._push_new_view(s, now, out)
            return
        known = self._vcs.get(s.sender)
        if known is not None and known.msg.view >= msg.view:
            self.stats["duplicate"] += 1
            return
        checked = check_view_change(self.codec, s.raw)
        self._vcs[s.sender] = checked
        higher = sorted(v.msg.view for v in self._vcs.values() if v.msg.view > self.view)
        if len(higher) >= self.config.weak_quorum:
            self._start_view_change(higher[0], now, out)
        elif msg.view == self.view and not self.active:
            self._check_view_change_quorum(now, out)

    def _check_view_change_quorum(self, now: float, out: list[Action]) -> None:
        vcs = sorted(
            (v for v in self._vcs.values() if v.msg.view == self.view),
            key=lambda v: (v.sender != self.id, v.sender),
        )
        if len(vcs) < self.config.quorum or self.active:
            return
        if self._vc_deadline is None:
            self._vc_deadline = now + self._timeout()
        if self.is_primary:
            chosen = vcs[: self.config.quorum]
            plan = plan_new_view(self.config, chosen)
            pps = [PrePrepare(self.view, seq, reqs) for seq, reqs in plan.batches]
            raws = tuple(self._sign(pp) for pp in pps)
            nv = NewView(self.view, tuple(v.raw for v in chosen), raws)
            raw = self._sign(nv)
            self._persist(out, raw)
            out.append(Broadcast(raw))
            self._enter_view(plan, list(zip(pps, raws, strict=True)), raw, now, out)

    def _on_new_view(self, s: Signed, msg: NewView, now: float, out: list[Action]) -> None:
        if msg.view < self.view or (msg.view == self.view and self.active):
            self.stats["old_view"] += 1
            return
        if s.sender != self.config.primary(msg.view):
            self.stats["not_primary"] += 1
            return
        self.codec.verify(s)
        vcs = [check_view_change(self.codec, raw) for raw in msg.view_changes]
        if any(v.msg.view != msg.view for v in vcs):
            raise ProtocolError("NEW-VIEW holds VIEW-CHANGEs for another view")
        plan = plan_new_view(self.config, vcs)
        if len(plan.batches) != len(msg.pre_prepares):
            self.stats["bogus_new_view"] += 1
            raise ProtocolError("NEW-VIEW's O does not match its VIEW-CHANGEs")
        pps: list[tuple[PrePrepare, bytes]] = []
        for raw, (seq, reqs) in zip(msg.pre_prepares, plan.batches, strict=True):
            p = self.codec.open(raw, Kind.PRE_PREPARE)
            pp = p.msg
            assert isinstance(pp, PrePrepare)
            if (p.sender, pp.view, pp.seq, pp.requests) != (s.sender, msg.view, seq, reqs):
                self.stats["bogus_new_view"] += 1
                raise ProtocolError("NEW-VIEW's O does not match its VIEW-CHANGEs")
            pps.append((pp, raw))
        self._persist(out, s.raw)
        self.view = msg.view
        self._enter_view(plan, pps, s.raw, now, out)

    def _enter_view(
        self,
        plan: NewViewPlan,
        pps: list[tuple[PrePrepare, bytes]],
        nv_raw: bytes,
        now: float,
        out: list[Action],
    ) -> None:
        self.active = True
        self._nv_raw, self._own_vc = nv_raw, b""
        self._vc_resend = None
        self._vc_deadline = None
        self._log = {k: e for k, e in self._log.items() if k[0] >= self.view}
        self._inflight = {rd: n for n, b in self._committed.items() for rd in b.pp.request_digests}
        if plan.min_s > self.stable_seq and plan.checkpoint_digest is not None:
            blob = self._own_blobs.get(plan.min_s)
            if plan.min_s <= self.last_executed and blob and digest(blob) == plan.checkpoint_digest:
                self._make_stable(plan.min_s, plan.checkpoint_proof, blob, out)
            elif plan.min_s > self.last_executed:
                signers = []
                for raw in plan.checkpoint_proof:
                    signers.append(self.codec.decode(raw).sender)
                self._start_fetch(plan.min_s, [x for x in signers if x != self.id], now, out)
        top = plan.min_s
        for pp, raw in pps:
            top = max(top, pp.seq)
            if not self._window(pp.seq):
                continue
            e = self._install_pp(pp, raw, self.config.primary(pp.view))
            own = None if e is None else e.prepares.get(self.id)
            if own is not None and not self.is_primary:
                out.append(Broadcast(own[1]))
        self._next_seq = max(top, self.stable_seq, self.last_executed) + 1
        self.stats["views_entered"] += 1
        out.append(ViewChanged(self.view, self.config.primary(self.view)))
        for e in list(self._log.values()):
            if e.view == self.view:
                self._progress(e, now, out)
        self._execute(now, out)
        if self._pending:
            self._vc_deadline = now + self._timeout()
        self._replay_future(now, out)
        self._propose(now, out)

    def _replay_future(self, now: float, out: list[Action]) -> None:
        buffered, self._future = self._future, {}
        for q in buffered.values():
            for raw in q:
                s = self.codec.decode(raw)
                msg = s.msg
                if isinstance(msg, PrePrepare | Prepare | Commit) and msg.view >= self.view:
                    try:
                        self._dispatch(s, now, out)
                    except (ProtocolError, AuthenticationError):
                        self.stats["invalid"] += 1

    # --- recovery after a lost log -----------------------------------------

    def _query_status(self, now: float, out: list[Action]) -> None:
        if not self._marker:
            self._marker = self._sign(Status(_RECOVERING, 0, 0, 0))
            self._persist(out, self._marker)
        if self._safe_seq is None:
            self._nonce = digest(repr((self.id, now, self.stats["status_queries"])).encode())
            self.stats["status_queries"] += 1
            self._statuses = {}
            out.append(Broadcast(self._sign(StatusQuery(self._nonce))))
        self._status_deadline = now + self.config.view_change_timeout

    def _on_status_query(self, s: Signed, msg: StatusQuery, out: list[Action]) -> None:
        self.codec.verify(s)
        last = max(self.last_executed, self._own_checkpoint_seq)
        reply = Status(msg.nonce, self.view, last, self.stable_seq)
        out.append(Send(s.sender, self._sign(reply)))

    def _on_status(self, s: Signed, msg: Status, now: float, out: list[Action]) -> None:
        if not self.recovering or self._safe_seq is not None or msg.nonce != self._nonce:
            self.stats["stale_status"] += 1
            return
        self.codec.verify(s)
        self._statuses[s.sender] = msg
        if len(self._statuses) < self.config.quorum:
            return
        window = self.config.watermark_window
        self._safe_seq = max(st.last_executed for st in self._statuses.values()) + window
        self._safe_view = max(st.view for st in self._statuses.values())
        self._marker = self._sign(Status(_RECOVERING, self._safe_view, self._safe_seq, 0))
        self._persist(out, self._marker)
        self._maybe_finish_recovery(now, out)

    def _maybe_finish_recovery(self, now: float, out: list[Action]) -> None:
        if self._safe_seq is None or self.stable_seq < self._safe_seq:
            return
        self.recovering = False
        self._marker = b""
        self._status_deadline = None
        self.stats["recovered"] += 1
        out.append(Recovered(self.stable_seq, self._safe_view))
        if self._safe_view == 0:
            self.view, self.active = 0, True
            out.append(Compact(tuple(self._live_records())))
        else:
            self.view = self._safe_view - 1
            self._start_view_change(self._safe_view, now, out)
            out.append(Compact(tuple(self._live_records())))
