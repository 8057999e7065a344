"""Pure checks for PBFT certificates, VIEW-CHANGE messages and the NEW-VIEW set O.

Kept apart from the replica so that the new primary (building O) and every
backup (recomputing O to reject a bogus NEW-VIEW) run literally the same code.
All functions raise ``ProtocolError``/``AuthenticationError`` on invalid input and
only accept a certificate or proof when every signature in it verifies: one bad
element rejects the whole message, it never hides behind valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.messages import (
    Checkpoint,
    Codec,
    Kind,
    Prepare,
    PreparedProof,
    PrePrepare,
    ViewChange,
)
from dwcp.errors import ProtocolError


def check_checkpoint_proof(codec: Codec, seq: int, proof: tuple[bytes, ...]) -> bytes | None:
    """Validate 2f+1 matching signed CHECKPOINTs for ``seq``; return their state digest.

    ``seq == 0`` is the initial state, proven by an empty proof (returns None).
    """
    config = codec.config
    if seq == 0:
        if proof:
            raise ProtocolError("the initial checkpoint has no proof")
        return None
    if len(proof) != config.quorum:
        raise ProtocolError(f"a checkpoint proof holds exactly {config.quorum} CHECKPOINTs")
    senders: set[int] = set()
    found: bytes | None = None
    for raw in proof:
        s = codec.open(raw, Kind.CHECKPOINT)
        msg = s.msg
        assert isinstance(msg, Checkpoint)
        if msg.seq != seq or s.sender in senders or (found is not None and msg.digest != found):
            raise ProtocolError("checkpoint proof messages do not match")
        senders.add(s.sender)
        found = msg.digest
    if seq % config.checkpoint_interval != 0:
        raise ProtocolError("checkpoints are taken every checkpoint_interval sequence numbers")
    return found


def check_prepared(codec: Codec, cert: PreparedProof, below_view: int, low: int) -> PrePrepare:
    """Validate a prepared certificate (PRE-PREPARE + 2f PREPAREs from distinct backups)."""
    config = codec.config
    s = codec.open(cert.pre_prepare, Kind.PRE_PREPARE)
    pp = s.msg
    assert isinstance(pp, PrePrepare)
    primary = config.primary(pp.view)
    if s.sender != primary:
        raise ProtocolError("certificate PRE-PREPARE is not from that view's primary")
    if pp.view >= below_view:
        raise ProtocolError("certificate is not from an earlier view")
    if not low < pp.seq <= low + config.watermark_window:
        raise ProtocolError("certificate sequence number outside the watermarks")
    if len(cert.prepares) != 2 * config.f:
        raise ProtocolError(f"a prepared certificate holds exactly {2 * config.f} PREPAREs")
    senders: set[int] = set()
    for raw in cert.prepares:
        p = codec.open(raw, Kind.PREPARE)
        msg = p.msg
        assert isinstance(msg, Prepare)
        if p.sender == primary or p.sender in senders:
            raise ProtocolError("certificate PREPAREs must come from distinct backups")
        if (msg.view, msg.seq, msg.digest) != (pp.view, pp.seq, pp.digest):
            raise ProtocolError("certificate PREPARE does not match its PRE-PREPARE")
        senders.add(p.sender)
    return pp


@dataclass(frozen=True, slots=True)
class CheckedViewChange:
    sender: int
    raw: bytes
    msg: ViewChange
    checkpoint_digest: bytes | None
    prepared: dict[int, PrePrepare]


def check_view_change(codec: Codec, raw: bytes) -> CheckedViewChange:
    """Fully validate a signed VIEW-CHANGE (its checkpoint proof and every certificate)."""
    s = codec.open(raw, Kind.VIEW_CHANGE)
    vc = s.msg
    assert isinstance(vc, ViewChange)
    if vc.view == 0:
        raise ProtocolError("no view change into view 0")
    d = check_checkpoint_proof(codec, vc.stable_seq, vc.checkpoint_proof)
    prepared: dict[int, PrePrepare] = {}
    for cert in vc.prepared:
        pp = check_prepared(codec, cert, vc.view, vc.stable_seq)
        if pp.seq in prepared:
            raise ProtocolError("two certificates for one sequence number")
        prepared[pp.seq] = pp
    return CheckedViewChange(s.sender, raw, vc, d, prepared)


@dataclass(frozen=True, slots=True)
class NewViewPlan:
    """What the 2f+1 VIEW-CHANGEs imply: the checkpoint to start from and the batches of O."""

    min_s: int
    checkpoint_proof: tuple[bytes, ...]
    checkpoint_digest: bytes | None
    batches: tuple[tuple[int, tuple[bytes, ...]], ...]


def plan_new_view(config: ClusterConfig, vcs: list[CheckedViewChange]) -> NewViewPlan:
    """Compute O: re-propose the highest-view prepared batch per sequence number, nulls in gaps."""
    if len({v.sender for v in vcs}) != config.quorum or len(vcs) != config.quorum:
        raise ProtocolError(f"a NEW-VIEW needs VIEW-CHANGEs from exactly {config.quorum} replicas")
    best = max(vcs, key=lambda v: (v.msg.stable_seq, -v.sender))
    min_s = best.msg.stable_seq
    chosen: dict[int, PrePrepare] = {}
    for v in vcs:
        for seq, pp in v.prepared.items():
            if seq > min_s and (seq not in chosen or pp.view > chosen[seq].view):
                chosen[seq] = pp
    max_s = max(chosen, default=min_s)
    batches = tuple(
        (seq, chosen[seq].requests if seq in chosen else ()) for seq in range(min_s + 1, max_s + 1)
    )
    return NewViewPlan(min_s, best.msg.checkpoint_proof, best.checkpoint_digest, batches)
