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

The message types themselves are in ``msgtypes`` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.msgtypes import (
    DIGEST_BYTES,
    DOMAIN,
    MAX_ITEMS,
    NULL_DIGEST,
    Checkpoint,
    Commit,
    FetchState,
    Kind,
    Message,
    NewView,
    Prepare,
    PreparedProof,
    PrePrepare,
    Replies,
    Reply,
    Request,
    State,
    Status,
    StatusQuery,
    ViewChange,
    batch_digest,
    check_bytes,
    check_int,
    digest,
    pack,
)
from dwcp.errors import AuthenticationError, ProtocolError
from dwcp.identity import SIGNATURE_BYTES, NodeKey, PublicKey

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
            max_array_len=MAX_ITEMS,
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
        raw: bytes = pack([int(msg.KIND), sender, body, sig])
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
        check_int("sender", sender)
        check_bytes("body", body)
        check_bytes("signature", sig, SIGNATURE_BYTES)
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
        if pack([kind_i, sender, body, sig]) != data:
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
