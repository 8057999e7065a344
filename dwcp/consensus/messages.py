"""Canonical, signed, size-capped encoding of every PBFT message.

Wire form (msgpack): ``[kind, sender, body, signature]`` where ``body`` is the
msgpack encoding of the message's fields and ``signature`` is Ed25519 over
``DOMAIN || msgpack([cluster_id, version, kind, sender]) || body``. The domain
tag binds a signature to one cluster, protocol version, message kind and
sender, so a message cannot be replayed into another cluster or reinterpreted
as another kind. Decoding checks the size before parsing, bounds every
container, rebuilds the message (each dataclass validates its fields) and
re-encodes it: any non-canonical byte string is rejected, so equal messages
always have equal bytes and equal digests.

``sender`` is a replica id, except for REQUEST where it is the index of the
client's key in ``ClusterConfig.clients``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import msgpack
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from dwcp.consensus.config import ClusterConfig
from dwcp.errors import AuthenticationError, ProtocolError
from dwcp.identity import SIGNATURE_BYTES, NodeKey, PublicKey

DOMAIN = b"dwcp-pbft\x00"
DIGEST_BYTES = 32
MAX_INT = (1 << 63) - 1
_MAX_ITEMS = 1 << 16
# One Packer for every encoding: msgpack.packb builds a new Packer (and parses its options)
# per call, which costs more than packing a vote. Packing these types never runs Python
# code, so the call holds the GIL throughout and the shared instance is thread-safe.
_pack = msgpack.Packer(use_bin_type=True).pack


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


def _int(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise ProtocolError(f"{name} must be an integer in 0..2**63-1, got {value!r:.40}")


def _bytes(name: str, value: object, size: int | None = None) -> None:
    if type(value) is not bytes:
        raise ProtocolError(f"{name} must be bytes")
    if size is not None and len(value) != size:
        raise ProtocolError(f"{name} must be {size} bytes, got {len(value)}")


def _raw_list(name: str, value: object) -> None:
    if type(value) is not tuple or len(value) > _MAX_ITEMS:
        raise ProtocolError(f"{name} must be a list of at most {_MAX_ITEMS} items")
    for item in value:
        _bytes(name, item)


class Message:
    """Base of the message dataclasses: ``fields()`` is the canonical body content."""

    KIND: ClassVar[Kind]

    def fields(self) -> tuple[Any, ...]:
        raise ProtocolError("abstract message")

    def body(self) -> bytes:
        body: bytes = _pack(self.fields())
        return body


@dataclass(frozen=True, slots=True)
class Request(Message):
    """A client's signed operation; ``timestamp`` orders one client's requests (at most once)."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    timestamp: int
    op: bytes

    def __post_init__(self) -> None:
        _int("timestamp", self.timestamp)
        _bytes("op", self.op)

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
        _int("view", self.view)
        _int("seq", self.seq)
        _raw_list("requests", self.requests)
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
        _int("view", self.view)
        _int("seq", self.seq)
        _bytes("digest", self.digest, DIGEST_BYTES)

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
        _int("seq", self.seq)
        _bytes("digest", self.digest, DIGEST_BYTES)

    def fields(self) -> tuple[Any, ...]:
        return (self.seq, self.digest)


@dataclass(frozen=True, slots=True)
class PreparedProof:
    """A prepared certificate: the PRE-PREPARE and 2f PREPAREs (raw signed messages)."""

    pre_prepare: bytes
    prepares: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _bytes("pre_prepare", self.pre_prepare)
        _raw_list("prepares", self.prepares)


@dataclass(frozen=True, slots=True)
class ViewChange(Message):
    """The sender moves to ``view``: its stable checkpoint proof and its prepared certificates."""

    KIND: ClassVar[Kind] = Kind.VIEW_CHANGE
    view: int
    stable_seq: int
    checkpoint_proof: tuple[bytes, ...]
    prepared: tuple[PreparedProof, ...]

    def __post_init__(self) -> None:
        _int("view", self.view)
        _int("stable_seq", self.stable_seq)
        _raw_list("checkpoint_proof", self.checkpoint_proof)
        if type(self.prepared) is not tuple or len(self.prepared) > _MAX_ITEMS:
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
        _int("view", self.view)
        _raw_list("view_changes", self.view_changes)
        _raw_list("pre_prepares", self.pre_prepares)

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
        _int("view", self.view)
        _int("client", self.client)
        _int("timestamp", self.timestamp)
        _bytes("result", self.result)

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
        _int("view", self.view)
        if type(self.entries) is not tuple or len(self.entries) > _MAX_ITEMS:
            raise ProtocolError(f"entries must be a list of at most {_MAX_ITEMS} items")
        for e in self.entries:
            if type(e) is not tuple or len(e) != 3:
                raise ProtocolError("a reply entry is [client, timestamp, result]")
            _int("client", e[0])
            _int("timestamp", e[1])
            _bytes("result", e[2])

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
        _int("seq", self.seq)

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
        _int("seq", self.seq)
        _bytes("blob", self.blob)
        _raw_list("proof", self.proof)

    def fields(self) -> tuple[Any, ...]:
        return (self.seq, self.blob, list(self.proof))


@dataclass(frozen=True, slots=True)
class StatusQuery(Message):
    """A replica that lost its log asks where the cluster is (``nonce`` makes replies fresh)."""

    KIND: ClassVar[Kind] = Kind.STATUS_QUERY
    nonce: bytes

    def __post_init__(self) -> None:
        _bytes("nonce", self.nonce)
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
        _bytes("nonce", self.nonce)
        _int("view", self.view)
        _int("last_executed", self.last_executed)
        _int("stable_seq", self.stable_seq)

    def fields(self) -> tuple[Any, ...]:
        return (self.nonce, self.view, self.last_executed, self.stable_seq)


M = TypeVar("M", bound=Message)


def _generic(cls: type[M]) -> Callable[[tuple[Any, ...]], M]:
    def build(items: tuple[Any, ...]) -> M:
        return cls(*items)

    return build


_BUILDERS: dict[Kind, Callable[[tuple[Any, ...]], Message]] = {
    Kind.REQUEST: _generic(Request),
    Kind.PRE_PREPARE: lambda t: PrePrepare(t[0], t[1], t[2]),
    Kind.PREPARE: _generic(Prepare),
    Kind.COMMIT: _generic(Commit),
    Kind.CHECKPOINT: _generic(Checkpoint),
    Kind.VIEW_CHANGE: ViewChange.from_fields,
    Kind.NEW_VIEW: _generic(NewView),
    Kind.REPLY: _generic(Reply),
    Kind.FETCH_STATE: _generic(FetchState),
    Kind.STATE: _generic(State),
    Kind.STATUS_QUERY: _generic(StatusQuery),
    Kind.STATUS: _generic(Status),
    Kind.REPLIES: _generic(Replies),
}
_KINDS: dict[int, Kind] = {int(k): k for k in _BUILDERS}
_ARITY = {
    Kind.REQUEST: 2,
    Kind.PRE_PREPARE: 3,
    Kind.PREPARE: 3,
    Kind.COMMIT: 3,
    Kind.CHECKPOINT: 2,
    Kind.VIEW_CHANGE: 4,
    Kind.NEW_VIEW: 3,
    Kind.REPLY: 4,
    Kind.FETCH_STATE: 1,
    Kind.STATE: 3,
    Kind.STATUS_QUERY: 1,
    Kind.STATUS: 4,
    Kind.REPLIES: 2,
}


def _unpack(data: bytes, limit: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_bin_len=limit,
            max_str_len=0,
            max_array_len=_MAX_ITEMS,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"undecodable message: {type(exc).__name__}") from exc


@dataclass(slots=True)
class Signed:
    """A decoded (not yet verified) message with its envelope (treat it as read-only).

    Not a frozen dataclass: one is built per received message, and a frozen one's
    ``__init__`` costs four times as much.
    """

    kind: Kind
    sender: int
    msg: Message
    raw: bytes
    body: bytes
    signature: bytes


class Codec:
    """Encodes, decodes and verifies messages of one cluster; caches verified messages.

    Verification costs ~38 us, so a message verified once (by its exact bytes) is
    remembered in a bounded cache and never verified again.
    """

    def __init__(self, config: ClusterConfig, cache_size: int = 1 << 16) -> None:
        self.config = config
        self._prefix: dict[tuple[int, int], bytes] = {}
        self._verified: dict[bytes, None] = {}
        self._cache_size = cache_size
        self.verifications = 0

    def _signed_bytes(self, kind: int, sender: int, body: bytes) -> bytes:
        prefix = self._prefix.get((kind, sender))
        if prefix is None:
            c = self.config
            tag = [c.cluster_id, c.protocol_version, kind, sender]
            head = msgpack.packb(tag, use_bin_type=True)
            prefix = DOMAIN + head
            if len(self._prefix) < 4096:
                self._prefix[(kind, sender)] = prefix
        return prefix + body

    def encode(self, msg: Message, sender: int, key: NodeKey) -> bytes:
        """Sign ``msg`` as ``sender`` and return its wire bytes."""
        body = msg.body()
        sig = key.sign(self._signed_bytes(int(msg.KIND), sender, body))
        raw: bytes = _pack([int(msg.KIND), sender, body, sig])
        self._remember(raw)
        return raw

    def decode(self, data: bytes, *, limit: int | None = None) -> Signed:
        """Parse and validate ``data`` without checking its signature (raise ``ProtocolError``)."""
        cap = self.config.max_message_bytes if limit is None else limit
        if type(data) is not bytes:
            raise ProtocolError("a message must be bytes")
        if len(data) > cap:
            raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {cap}")
        env = _unpack(data, cap)
        if type(env) is not tuple or len(env) != 4:
            raise ProtocolError("an envelope is [kind, sender, body, signature]")
        kind_i, sender, body, sig = env
        kind = _KINDS.get(kind_i) if type(kind_i) is int else None
        if kind is None:
            raise ProtocolError(f"unknown message kind {kind_i!r:.20}")
        _int("sender", sender)
        _bytes("body", body)
        _bytes("signature", sig, SIGNATURE_BYTES)
        limit_sender = len(self.config.clients) if kind is Kind.REQUEST else self.config.n
        if sender >= limit_sender:
            raise ProtocolError(f"unknown sender {sender} for {kind.name}")
        if kind is Kind.REQUEST and len(data) > self.config.max_request_bytes:
            raise ProtocolError("request exceeds max_request_bytes")
        items = _unpack(body, cap)
        if type(items) is not tuple or len(items) != _ARITY[kind]:
            raise ProtocolError(f"{kind.name} body has the wrong shape")
        msg = _BUILDERS[kind](items)
        if msg.body() != body:
            raise ProtocolError(f"{kind.name} is not canonically encoded")
        if _pack([kind_i, sender, body, sig]) != data:
            raise ProtocolError("envelope is not canonically encoded")
        return Signed(kind, sender, msg, data, body, sig)

    def signer(self, s: Signed) -> PublicKey:
        """The public key ``s`` claims to be signed with."""
        if s.kind is Kind.REQUEST:
            return self.config.clients[s.sender]
        return self.config.replicas[s.sender]

    def verify(self, s: Signed) -> None:
        """Raise ``AuthenticationError`` unless ``s`` carries its sender's valid signature."""
        key = digest(s.raw)
        if key in self._verified:
            return
        self.verifications += 1
        signer = self.signer(s)
        try:
            # libsodium directly: no VerifyKey object per call (decode checked the sizes).
            signed = self._signed_bytes(int(s.kind), s.sender, s.body)
            crypto_sign_open(s.signature + signed, signer.raw)
        except BadSignatureError as exc:
            raise AuthenticationError(
                f"bad {s.kind.name} signature from node {signer.node_id}: the message was "
                "altered or signed by another key"
            ) from exc
        self._remember(raw=None, key=key)

    def is_verified(self, raw: bytes) -> bool:
        return digest(raw) in self._verified

    def _remember(self, raw: bytes | None, key: bytes | None = None) -> None:
        k = key if key is not None else digest(raw or b"")
        self._verified[k] = None
        if len(self._verified) > self._cache_size:
            del self._verified[next(iter(self._verified))]

    def open(self, data: bytes, kind: Kind | None = None, *, limit: int | None = None) -> Signed:
        """Decode and verify, optionally requiring ``kind`` (ProtocolError, AuthenticationError)."""
        s = self.decode(data, limit=limit)
        if kind is not None and s.kind is not kind:
            raise ProtocolError(f"expected {kind.name}, got {s.kind.name}")
        self.verify(s)
        return s


__all__ = [
    "DIGEST_BYTES",
    "NULL_DIGEST",
    "AuthenticationError",
    "Checkpoint",
    "Codec",
    "Commit",
    "FetchState",
    "Kind",
    "Message",
    "NewView",
    "PrePrepare",
    "Prepare",
    "PreparedProof",
    "Replies",
    "Reply",
    "Request",
    "Signed",
    "State",
    "Status",
    "StatusQuery",
    "ViewChange",
    "batch_digest",
    "digest",
]
