"""PBFT checkpoints, garbage collection and state transfer.

Every K sequence numbers replicas exchange CHECKPOINTs; 2f+1 matching ones make
it stable, move the watermarks and garbage-collect the log (which the driver then
compacts to a self-signed STATE record plus what is still live). A replica that
falls behind (f+1 replicas working beyond its high watermark, or a stable
checkpoint it has not reached) fetches the state of that checkpoint, checks it
against the checkpoint's proof and installs it.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from dwcp.consensus.actions import Action, Broadcast, Send, StateTransferred
from dwcp.consensus.context import ReplicaContext
from dwcp.consensus.durability import Durability
from dwcp.consensus.log import decode_state, encode_state
from dwcp.consensus.messages import Checkpoint, FetchState, Signed, State, digest
from dwcp.consensus.normal import NormalCase
from dwcp.consensus.viewchange import check_checkpoint_proof
from dwcp.errors import ProtocolError


class CheckpointHost(Protocol):
    """What checkpoints and state transfer ask of the rest of the replica."""

    def window_moved(self, now: float, out: list[Action]) -> None:
        """The low watermark moved: propose what waited for room, replay what was early."""

    def compact(self, out: list[Action]) -> None:
        """A checkpoint became stable: rewrite the log to what is still live."""

    def state_installed(self, now: float, out: list[Action]) -> None:
        """A fetched state was installed (a recovering replica may be done)."""


class Checkpoints:
    """Checkpoint votes, the stable checkpoint with its proof, and fetching others' state."""

    def __init__(
        self,
        ctx: ReplicaContext,
        durability: Durability,
        normal: NormalCase,
        host: CheckpointHost,
    ) -> None:
        self.ctx = ctx
        self.durability = durability
        self.normal = normal
        self.host = host
        self.stable_proof: tuple[bytes, ...] = ()
        self.stable_blob = encode_state(ctx.app.snapshot(), ctx.clients)
        self.votes: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        # Each sender's latest CHECKPOINT far beyond our window (where we may have to go).
        self.far: dict[int, tuple[int, bytes, bytes]] = {}
        self.own_blobs: dict[int, bytes] = {}
        self.own_checkpoint_seq = 0
        self.fetch_seq = 0
        self.fetch_deadline: float | None = None
        self.served: dict[int, tuple[int, float]] = {}
        self.ahead: dict[int, int] = {}

    def base_record(self) -> bytes:
        """The stable checkpoint as a self-signed STATE (the first record of a compacted log)."""
        ctx = self.ctx
        return ctx.sign(State(ctx.stable_seq, self.stable_blob, self.stable_proof))

    def records(self) -> list[bytes]:
        """The CHECKPOINT votes above the stable checkpoint."""
        return [raw for votes in self.votes.values() for _, raw in votes.values()]

    def tick(self, now: float, out: list[Action]) -> None:
        """Ask everyone again for the state we are fetching, or stop when we have it."""
        ctx = self.ctx
        if self.fetch_deadline is not None and now >= self.fetch_deadline:
            if self.fetch_seq > ctx.last_executed:
                raw = ctx.sign(FetchState(self.fetch_seq))
                out.append(Broadcast(raw))
                self.fetch_deadline = now + ctx.timeout()
            else:
                self.fetch_deadline = None

    # --- checkpoints -------------------------------------------------------

    def take_checkpoint(self, seq: int, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        blob = encode_state(ctx.app.snapshot(), ctx.clients)
        d = digest(blob)
        self.own_blobs[seq] = blob
        self.own_checkpoint_seq = max(self.own_checkpoint_seq, seq)
        raw = ctx.sign(Checkpoint(seq, d))
        self.durability.persist(out, raw)
        if not ctx.replaying:
            out.append(Broadcast(raw))
        self.store_checkpoint(Checkpoint(seq, d), ctx.id, raw)
        self.check_stable(seq, now, out)

    def store_checkpoint(self, msg: Checkpoint, sender: int, raw: bytes) -> bool:
        ctx = self.ctx
        if msg.seq <= ctx.stable_seq:
            return False
        if msg.seq > ctx.stable_seq + 2 * ctx.config.watermark_window:
            far = self.far.get(sender)
            if far is not None and far[0] >= msg.seq:
                return False
            self.far[sender] = (msg.seq, msg.digest, raw)
            return True
        votes = self.votes.setdefault(msg.seq, {})
        if sender in votes:
            return False
        votes[sender] = (msg.digest, raw)
        return True

    def on_checkpoint(self, s: Signed, msg: Checkpoint, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if msg.seq <= ctx.stable_seq or msg.seq % ctx.config.checkpoint_interval:
            ctx.stats["old_checkpoint"] += 1
            return
        votes = self.votes.get(msg.seq, {})
        far = self.far.get(s.sender)
        if s.sender in votes or (far is not None and far[0] >= msg.seq):
            ctx.stats["duplicate"] += 1
            return
        ctx.codec.verify(s)
        if self.store_checkpoint(msg, s.sender, s.raw):
            self.durability.lazy_persist(s.raw, out)
        self.check_stable(msg.seq, now, out)

    def check_stable(self, seq: int, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        votes = self.votes.get(seq)
        if votes is None:
            votes = {s: (d, raw) for s, (q, d, raw) in self.far.items() if q == seq}
        by_digest = Counter(d for d, _ in votes.values())
        if not by_digest:
            return
        d, count = by_digest.most_common(1)[0]
        if count < ctx.config.quorum:
            return
        proof = tuple(raw for _, (dg, raw) in sorted(votes.items()) if dg == d)
        proof = proof[: ctx.config.quorum]
        if seq <= ctx.last_executed:
            blob = self.own_blobs.get(seq)
            if blob is None or digest(blob) != d:
                ctx.stats["checkpoint_mismatch"] += 1
                return
            self.make_stable(seq, proof, blob, out)
            self.host.window_moved(now, out)
        else:
            signers = [s for s, (dg, _) in sorted(votes.items()) if dg == d and s != ctx.id]
            self.start_fetch(seq, signers, now, out)

    def make_stable(
        self, seq: int, proof: tuple[bytes, ...], blob: bytes, out: list[Action]
    ) -> None:
        ctx = self.ctx
        if seq <= ctx.stable_seq:
            return
        ctx.stable_seq, self.stable_proof, self.stable_blob = seq, proof, blob
        self.normal.collect_garbage(seq)
        self.votes = {n: v for n, v in self.votes.items() if n > seq}
        self.far = {s: v for s, v in self.far.items() if v[0] > seq}
        self.own_blobs = {n: b for n, b in self.own_blobs.items() if n >= seq}
        ctx.stats["stable_checkpoints"] += 1
        if not ctx.replaying:
            self.durability.lazy.clear()
            self.host.compact(out)

    # --- state transfer ----------------------------------------------------

    def beyond_window(self, s: Signed, seq: int, now: float, out: list[Action]) -> None:
        """A verified message for ``seq`` beyond our high watermark: note its sender ahead."""
        if self.ahead.get(s.sender, -1) < seq:
            self.ctx.codec.verify(s)
            self.note_ahead(s.sender, seq, now, out)

    def note_ahead(self, sender: int, seq: int, now: float, out: list[Action]) -> None:
        """f+1 replicas working beyond our high watermark: we fell behind, fetch their state."""
        ctx = self.ctx
        self.ahead[sender] = seq
        ahead = [s for s, q in sorted(self.ahead.items()) if q > ctx.stable_seq]
        if len(ahead) >= ctx.config.weak_quorum and self.fetch_deadline is None:
            self.ahead.clear()
            self.start_fetch(ctx.last_executed + 1, ahead, now, out)

    def start_fetch(self, seq: int, signers: list[int], now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if seq <= self.fetch_seq and self.fetch_deadline is not None:
            return
        self.fetch_seq = max(self.fetch_seq, seq)
        raw = ctx.sign(FetchState(seq))
        for s in signers[: ctx.config.weak_quorum]:
            out.append(Send(s, raw))
        self.fetch_deadline = now + ctx.timeout()
        ctx.stats["state_fetches"] += 1

    def on_fetch(self, s: Signed, msg: FetchState, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if ctx.stable_seq == 0 or ctx.stable_seq < msg.seq:
            ctx.stats["fetch_unavailable"] += 1
            return
        served = self.served.get(s.sender, (-1, 0.0))
        if served[0] == ctx.stable_seq and now - served[1] < ctx.timeout():
            ctx.stats["fetch_rate_limited"] += 1  # one snapshot per requester per timeout
            return
        ctx.codec.verify(s)
        self.served[s.sender] = (ctx.stable_seq, now)
        out.append(Send(s.sender, self.base_record()))

    def on_state(self, s: Signed, msg: State, now: float, out: list[Action]) -> None:
        ctx = self.ctx
        if msg.seq <= ctx.last_executed:
            ctx.stats["stale_state"] += 1
            return
        ctx.codec.verify(s)
        d = check_checkpoint_proof(ctx.codec, msg.seq, msg.proof)
        if d is None or digest(msg.blob) != d:
            raise ProtocolError("state does not match its checkpoint proof")
        decode_state(msg.blob, len(ctx.config.clients))
        self.install_state(msg, out)
        self.host.window_moved(now, out)
        if not ctx.replaying:
            out.append(StateTransferred(msg.seq))
        ctx.stats["state_transfers"] += 1
        self.normal.execute(now, out)
        self.host.state_installed(now, out)

    def install_state(self, msg: State, out: list[Action]) -> None:
        ctx = self.ctx
        if msg.seq <= ctx.last_executed:
            return
        snapshot, clients = decode_state(msg.blob, len(ctx.config.clients))
        ctx.app.restore(snapshot)
        ctx.clients = clients
        ctx.last_executed = msg.seq
        self.own_blobs[msg.seq] = msg.blob
        self.normal.forget_answered()
        if self.fetch_seq <= msg.seq:
            self.fetch_deadline = None
        self.make_stable(msg.seq, msg.proof, msg.blob, out)
