"""The PBFT message types: one small frozen dataclass per message, read as a table.

Each dataclass validates its own fields on construction, so a decoded message is
well-formed by the time anything reads it; ``fields()`` is the canonical content of
its body. The envelope, signatures and decoding are in ``messages`` (which
re-exports these names: import them from there).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import msgpack

from dwcp.errors import ProtocolError

DOMAIN = b"dwcp-pbft\x00"
DIGEST_BYTES = 32
MAX_INT = (1 << 63) - 1
MAX_ITEMS = 1 << 16
# One Packer for every encoding: msgpack.packb builds a new Packer (and parses its options)
# per call, which costs more than packing a vote. Packing these types never runs Python
# code, so the call holds the GIL throughout and the shared instance is thread-safe.
pack = msgpack.Packer(use_bin_type=True).pack


def digest(data: bytes) -> bytes:
    """The 32-byte BLAKE2b hash used for requests, batches and checkpoints."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def batch_digest(request_digests: tuple[bytes, ...]) -> bytes:
    """Digest of a batch; the empty batch is the null request."""
    return digest(b"batch\x00" + b"".join(request_digests))


NULL_DIGEST = batch_digest(())


class Kind(IntEnum):
    REQUEST = 1
    PRE_PREPARE = 2
    PREPARE = 3
    COMMIT = 4
    CHECKPOINT = 5
    VIEW_CHANGE = 6
    NEW_VIEW = 7
    REPLY = 8
    FETCH_STATE = 9
    STATE = 10
    STATUS_QUERY = 11
    STATUS = 12
    REPLIES = 13


def check_int(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise ProtocolError(f"{name} must be an integer in 0..2**63-1, got {value!r:.40}")


def check_bytes(name: str, value: object, size: int | None = None) -> None:
    if type(value) is not bytes:
        raise ProtocolError(f"{name} must be bytes")
    if size is not None and len(value) != size:
        raise ProtocolError(f"{name} must be {size} bytes, got {len(value)}")


def check_raw_list(name: str, value: object) -> None:
    if type(value) is not tuple or len(value) > MAX_ITEMS:
        raise ProtocolError(f"{name} must be a list of at most {MAX_ITEMS} items")
    for item in value:
        check_bytes(name, item)


class Message:
    """Base of the message dataclasses: ``fields()`` is the canonical body content."""

    KIND: ClassVar[Kind]

    def fields(self) -> tuple[Any, ...]:
        raise ProtocolError("abstract message")

    def body(self) -> bytes:
        body: bytes = pack(self.fields())
        return body


@dataclass(frozen=True, slots=True)
class Request(Message):
    """A client's signed operation; ``timestamp`` orders one client's requests (at most once)."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    timestamp: int
    op: bytes

    def __post_init__(self) -> None:
        check_int("timestamp", self.timestamp)
        check_bytes("op", self.op)

    def fields(self) -> tuple[Any, ...]:
        return (self.timestamp, self.op)


@dataclass(frozen=True, slots=True)
class PrePrepare(Message):
    """The primary assigns sequence number ``seq`` in ``view`` to a batch of signed requests."""

    KIND: ClassVar[Kind] = Kind.PRE_PREPARE
    view: int
    seq: int
    requests: tuple[bytes, ...]
    digest: bytes = field(init=False, compare=False, repr=False)
    request_digests: tuple[bytes, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_int("view", self.view)
        check_int("seq", self.seq)
        check_raw_list("requests", self.requests)
        if self.seq == 0:
            raise ProtocolError("sequence numbers start at 1")
        rds = tuple(digest(r) for r in self.requests)
        if len(set(rds)) != len(rds):
            raise ProtocolError("a batch holds the same request twice")
        object.__setattr__(self, "request_digests", rds)
        object.__setattr__(self, "digest", batch_digest(rds))

    def fields(self) -> tuple[Any, ...]:
        return (self.view, self.seq, list(self.requests))


@dataclass(frozen=True, slots=True)
class _Vote(Message):
    """A vote for batch ``digest`` at ``seq`` in ``view`` (PREPARE and COMMIT share the form)."""

    view: int
    seq: int
    digest: bytes

    def __post_init__(self) -> None:
        check_int("view", self.view)
        check_int("seq", self.seq)
        check_bytes("digest", self.digest, DIGEST_BYTES)

    def fields(self) -> tuple[Any, ...]:
        return (self.view, self.seq, self.digest)


@dataclass(frozen=True, slots=True)
class Prepare(_Vote):
    KIND: ClassVar[Kind] = Kind.PREPARE


@dataclass(frozen=True, slots=True)
class Commit(_Vote):
    KIND: ClassVar[Kind] = Kind.COMMIT


@dataclass(frozen=True, slots=True)
class Checkpoint(Message):
    """The sender's state after executing ``seq`` hashes to ``digest``."""

    KIND: ClassVar[Kind] = Kind.CHECKPOINT
    seq: int
    digest: bytes

    def __post_init__(self) -> None:
        check_int("seq", self.seq)
        check_bytes("digest", self.digest, DIGEST_BYTES)

    def fields(self) -> tuple[Any, ...]:
        return (self.seq, self.digest)


@dataclass(frozen=True, slots=True)
class PreparedProof:
    """A prepared certificate: the PRE-PREPARE and 2f PREPAREs (raw signed messages)."""

    pre_prepare: bytes
    prepares: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_bytes("pre_prepare", self.pre_prepare)
        check_raw_list("prepares", self.prepares)


@dataclass(frozen=True, slots=True)
class ViewChange(Message):
    """The sender moves to ``view``: its stable checkpoint proof and its prepared certificates."""

    KIND: ClassVar[Kind] = Kind.VIEW_CHANGE
    view: int
    stable_seq: int
    checkpoint_proof: tuple[bytes, ...]
    prepared: tuple[PreparedProof, ...]

    def __post_init__(self) -> None:
        check_int("view", self.view)
        check_int("stable_seq", self.stable_seq)
        check_raw_list("checkpoint_proof", self.checkpoint_proof)
        if type(self.prepared) is not tuple or len(self.prepared) > MAX_ITEMS:
            raise ProtocolError("prepared must be a list of certificates")
        for p in self.prepared:
            if type(p) is not PreparedProof:
                raise ProtocolError("prepared must hold certificates")

    def fields(self) -> tuple[Any, ...]:
        certs = [[p.pre_prepare, list(p.prepares)] for p in self.prepared]
        return (self.view, self.stable_seq, list(self.checkpoint_proof), certs)

    @classmethod
    def from_fields(cls, items: tuple[Any, ...]) -> ViewChange:
        view, stable_seq, proof, certs = items
        if type(certs) is not tuple:
            raise ProtocolError("prepared must be a list")
        prepared = []
        for c in certs:
            if type(c) is not tuple or len(c) != 2:
                raise ProtocolError("a certificate is [pre_prepare, prepares]")
            prepared.append(PreparedProof(c[0], c[1]))
        return cls(view, stable_seq, proof, tuple(prepared))


@dataclass(frozen=True, slots=True)
class NewView(Message):
    """The new primary starts ``view``: 2f+1 VIEW-CHANGEs and the PRE-PREPAREs they imply (O)."""

    KIND: ClassVar[Kind] = Kind.NEW_VIEW
    view: int
    view_changes: tuple[bytes, ...]
    pre_prepares: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_int("view", self.view)
        check_raw_list("view_changes", self.view_changes)
        check_raw_list("pre_prepares", self.pre_prepares)

    def fields(self) -> tuple[Any, ...]:
        return (self.view, list(self.view_changes), list(self.pre_prepares))


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """The sender executed the request of ``client`` (index) at ``timestamp`` with ``result``."""

    KIND: ClassVar[Kind] = Kind.REPLY
    view: int
    client: int
    timestamp: int
    result: bytes

    def __post_init__(self) -> None:
        check_int("view", self.view)
        check_int("client", self.client)
        check_int("timestamp", self.timestamp)
        check_bytes("result", self.result)

    def fields(self) -> tuple[Any, ...]:
        return (self.view, self.client, self.timestamp, self.result)


@dataclass(frozen=True, slots=True)
class Replies(Message):
    """REPLY for every request of one executed batch, signed once: ``(client, timestamp, result)``.

    A client treats its own entry exactly like a REPLY. One signature per batch instead
    of one per request, and a client pool verifies it once for all its clients.
    """

    KIND: ClassVar[Kind] = Kind.REPLIES
    view: int
    entries: tuple[tuple[int, int, bytes], ...]

    def __post_init__(self) -> None:
        check_int("view", self.view)
        if type(self.entries) is not tuple or len(self.entries) > MAX_ITEMS:
            raise ProtocolError(f"entries must be a list of at most {MAX_ITEMS} items")
        for e in self.entries:
            if type(e) is not tuple or len(e) != 3:
                raise ProtocolError("a reply entry is [client, timestamp, result]")
            check_int("client", e[0])
            check_int("timestamp", e[1])
            check_bytes("result", e[2])

    def fields(self) -> tuple[Any, ...]:
        return (self.view, [list(e) for e in self.entries])

    def result_for(self, client: int, timestamp: int) -> bytes | None:
        """The result for ``client``'s request ``timestamp``, if this message holds it."""
        for c, ts, result in self.entries:
            if c == client and ts == timestamp:
                return result
        return None


@dataclass(frozen=True, slots=True)
class FetchState(Message):
    """Ask for the sender's stable checkpoint at or above ``seq`` (state transfer)."""

    KIND: ClassVar[Kind] = Kind.FETCH_STATE
    seq: int

    def __post_init__(self) -> None:
        check_int("seq", self.seq)

    def fields(self) -> tuple[Any, ...]:
        return (self.seq,)


@dataclass(frozen=True, slots=True)
class State(Message):
    """A stable checkpoint: the state blob at ``seq`` and 2f+1 CHECKPOINTs proving its digest."""

    KIND: ClassVar[Kind] = Kind.STATE
    seq: int
    blob: bytes
    proof: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_int("seq", self.seq)
        check_bytes("blob", self.blob)
        check_raw_list("proof", self.proof)

    def fields(self) -> tuple[Any, ...]:
        return (self.seq, self.blob, list(self.proof))


@dataclass(frozen=True, slots=True)
class StatusQuery(Message):
    """A replica that lost its log asks where the cluster is (``nonce`` makes replies fresh)."""

    KIND: ClassVar[Kind] = Kind.STATUS_QUERY
    nonce: bytes

    def __post_init__(self) -> None:
        check_bytes("nonce", self.nonce)
        if len(self.nonce) > 64:
            raise ProtocolError("nonce is at most 64 bytes")

    def fields(self) -> tuple[Any, ...]:
        return (self.nonce,)


@dataclass(frozen=True, slots=True)
class Status(Message):
    """Answer to STATUS-QUERY: the sender's view, last executed and stable sequence numbers."""

    KIND: ClassVar[Kind] = Kind.STATUS
    nonce: bytes
    view: int
    last_executed: int
    stable_seq: int

    def __post_init__(self) -> None:
        check_bytes("nonce", self.nonce)
        check_int("view", self.view)
        check_int("last_executed", self.last_executed)
        check_int("stable_seq", self.stable_seq)

    def fields(self) -> tuple[Any, ...]:
        return (self.nonce, self.view, self.last_executed, self.stable_seq)
