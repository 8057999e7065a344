"""Migration messages and their codec (msgpack arrays, version-tagged, size-capped).

One frozen dataclass per message; constructors validate their fields, so a
message that decodes is well-formed (h11's habit). ``decode`` turns anything
malformed, oversized or of the wrong type into ``ProtocolError``; it never
raises anything else and never allocates more than the input's size allows.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from dwcp.errors import ProtocolError

# 2: the offer names the content, Done carries the signed SHA-256;
# 3: messages framed by dwcp.framing (u32 length in network byte order)
VERSION = 3
MAX_MESSAGE = 256 * 1024 * 1024  # the largest encoded message accepted
MAX_FRAME = 64 * 1024 * 1024  # the largest data frame accepted
MAX_RANGES = 1 << 20  # missing ranges in one plan (16 MiB packed)
MAX_TEXT = 4096
_TID_RE = re.compile(r"^[0-9a-f]{32}$")
_RANGE = struct.Struct("<QQ")
SIGNING_CONTEXT = b"dwcp-migrate-offer-v2\x00"
DONE_SIGNING_CONTEXT = b"dwcp-migrate-done-v2\x00"


def _check_tid(tid: str) -> None:
    if not isinstance(tid, str) or not _TID_RE.match(tid):
        raise ProtocolError(f"bad transfer id {tid!r}: expected 32 hex digits")


def _check_int(name: str, v: int, hi: int = 2**63 - 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise ProtocolError(f"{name}: expected an integer from 0 to {hi}, got {v!r}")


def _check_bytes(name: str, v: bytes, lo: int, hi: int) -> None:
    if not isinstance(v, bytes) or not lo <= len(v) <= hi:
        raise ProtocolError(f"{name}: expected {lo}-{hi} bytes")


def _check_text(name: str, v: str, hi: int = MAX_TEXT) -> None:
    if not isinstance(v, str) or len(v) > hi:
        raise ProtocolError(f"{name}: expected text of at most {hi} characters")


def pack_ranges(ranges: list[tuple[int, int]]) -> bytes:
    """Pack ``(offset, length)`` pairs as little-endian u64 pairs."""
    return b"".join(_RANGE.pack(o, n) for o, n in ranges)


def unpack_ranges(data: bytes) -> list[tuple[int, int]]:
    """Unpack ranges, checking they are sorted, non-empty and do not overlap."""
    if len(data) % _RANGE.size or len(data) // _RANGE.size > MAX_RANGES:
        raise ProtocolError("range list: bad length")
    out: list[tuple[int, int]] = []
    end = 0
    for o, n in _RANGE.iter_unpack(data):
        if n == 0 or o < end or o + n > 2**63:
            raise ProtocolError("range list: ranges must be non-empty, sorted and disjoint")
        out.append((o, n))
        end = o + n
    return out


class Message:
    """Base of every migration message."""

    TYPE: ClassVar[int]
    transfer_id: str

    def fields(self) -> list[Any]:
        raise ProtocolError("abstract message")  # pragma: no cover


@dataclass(frozen=True)
class Offer(Message):
    """Source -> destination: the signed manifest summary (hash-tree parents) of the image.

    The destination asks for the leaves of the regions it does not hold
    (``NeedLeaves``/``Leaves``), so metadata costs grow with the change, not the size.
    ``content_id`` (``dwcp.delta.content_id``: SHA-256 of the size and every block's
    fingerprint) names the image as soon as it is fingerprinted; the whole-image
    SHA-256, one more pass over the image, is computed while the data flows and
    arrives signed in ``Done``.
    """

    TYPE: ClassVar[int] = 1
    transfer_id: str
    name: str
    size: int
    content_id: bytes
    summary: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        _check_text("name", self.name, 255)
        _check_int("size", self.size)
        _check_bytes("content_id", self.content_id, 32, 32)
        _check_bytes("summary", self.summary, 1, MAX_MESSAGE - 4096)
        _check_bytes("signature", self.signature, 64, 64)

    def fields(self) -> list[Any]:
        return [
            self.transfer_id,
            self.name,
            self.size,
            self.content_id,
            self.summary,
            self.signature,
        ]


def offer_signing_payload(
    transfer_id: str, name: str, size: int, content_id: bytes, summary: bytes
) -> bytes:
    """What the source signs: every field of the offer, unambiguously encoded."""
    body = msgpack.packb([transfer_id, name, size, content_id, summary], use_bin_type=True)
    return SIGNING_CONTEXT + body


def done_signing_payload(transfer_id: str, sha256: bytes) -> bytes:
    """What the source signs when it ends: the transfer and the image's SHA-256."""
    return DONE_SIGNING_CONTEXT + msgpack.packb([transfer_id, sha256], use_bin_type=True)


@dataclass(frozen=True)
class Plan(Message):
    """Destination -> source: the byte ranges it still needs, and what it already had."""

    TYPE: ClassVar[int] = 2
    transfer_id: str
    missing: tuple[tuple[int, int], ...]
    bytes_missing: int  # total missing for the whole image (first plan)
    bytes_local: int  # found in local images
    bytes_zero: int  # zero blocks

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        for name in ("bytes_missing", "bytes_local", "bytes_zero"):
            _check_int(name, getattr(self, name))
        if len(self.missing) > MAX_RANGES:
            raise ProtocolError(f"plan: more than {MAX_RANGES} ranges")

    @property
    def bytes_pending(self) -> int:
        return sum(n for _, n in self.missing)

    def fields(self) -> list[Any]:
        return [
            self.transfer_id,
            pack_ranges(list(self.missing)),
            self.bytes_missing,
            self.bytes_local,
            self.bytes_zero,
        ]


@dataclass(frozen=True)
class Data(Message):
    """Source -> destination: one encoded delta frame (when not sent over bulk streams)."""

    TYPE: ClassVar[int] = 3
    transfer_id: str
    frame: bytes

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        _check_bytes("frame", self.frame, 1, MAX_FRAME)

    def fields(self) -> list[Any]:
        return [self.transfer_id, self.frame]


@dataclass(frozen=True)
class Done(Message):
    """Source -> destination: all frames sent, and the image's signed SHA-256.

    The counts let the destination await stragglers.
    """

    TYPE: ClassVar[int] = 4
    transfer_id: str
    frames: int
    wire_bytes: int
    sha256: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        _check_int("frames", self.frames)
        _check_int("wire_bytes", self.wire_bytes)
        _check_bytes("sha256", self.sha256, 32, 32)
        _check_bytes("signature", self.signature, 64, 64)

    def fields(self) -> list[Any]:
        return [self.transfer_id, self.frames, self.wire_bytes, self.sha256, self.signature]


@dataclass(frozen=True)
class Ack(Message):
    """Destination -> source: the image is verified, fsynced, renamed and indexed."""

    TYPE: ClassVar[int] = 5
    transfer_id: str
    sha256: bytes
    path_name: str

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        _check_bytes("sha256", self.sha256, 32, 32)
        _check_text("path_name", self.path_name, 255)

    def fields(self) -> list[Any]:
        return [self.transfer_id, self.sha256, self.path_name]


MAX_GROUPS = 1 << 24  # 1 MiB groups: 16 TiB


@dataclass(frozen=True)
class NeedLeaves(Message):
    """Destination -> source: send the block fingerprints of these 1 MiB groups."""

    TYPE: ClassVar[int] = 7
    transfer_id: str
    groups: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        if len(self.groups) > MAX_GROUPS or any(
            isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < MAX_GROUPS
            for g in self.groups
        ):
            raise ProtocolError("NeedLeaves: bad group list")

    def fields(self) -> list[Any]:
        return [self.transfer_id, struct.pack(f"<{len(self.groups)}I", *self.groups)]


@dataclass(frozen=True)
class Leaves(Message):
    """Source -> destination: the leaves asked for (``dwcp.delta.summary.leaves_bytes``)."""

    TYPE: ClassVar[int] = 8
    transfer_id: str
    data: bytes

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        _check_bytes("data", self.data, 0, MAX_MESSAGE - 4096)

    def fields(self) -> list[Any]:
        return [self.transfer_id, self.data]


ERROR_CODES = frozenset(
    {"busy", "integrity", "disk_full", "refused", "image_changed", "protocol", "too_large", "io"}
)


@dataclass(frozen=True)
class Error(Message):
    """Either way: the transfer stops; ``code`` is one of ``ERROR_CODES``."""

    TYPE: ClassVar[int] = 6
    transfer_id: str
    code: str
    message: str

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        if self.code not in ERROR_CODES:
            raise ProtocolError(f"unknown error code {self.code!r}")
        _check_text("message", self.message)

    def fields(self) -> list[Any]:
        return [self.transfer_id, self.code, self.message]


_TYPES: dict[int, type[Message]] = {
    m.TYPE: m for m in (Offer, Plan, Data, Done, Ack, Error, NeedLeaves, Leaves)
}


def encode(msg: Message) -> bytes:
    """Serialise ``msg``; the result decodes back to an equal message."""
    out: bytes = msgpack.packb([VERSION, msg.TYPE, *msg.fields()], use_bin_type=True)
    return out


def decode(data: bytes) -> Message:
    """Parse one message; raise ``ProtocolError`` for anything malformed or too large."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=MAX_MESSAGE,
            max_str_len=MAX_TEXT,
            max_array_len=16,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable migration message: {exc}") from None
    if not isinstance(obj, list) or len(obj) < 2:
        raise ProtocolError("migration message: expected [version, type, ...]")
    version, mtype, *fields = obj
    if version != VERSION:
        raise ProtocolError(f"migration protocol version {version!r}; this node speaks {VERSION}")
    cls = _TYPES.get(mtype) if isinstance(mtype, int) and not isinstance(mtype, bool) else None
    if cls is None:
        raise ProtocolError(f"unknown migration message type {mtype!r}")
    if cls is Plan:
        if len(fields) != 5 or not isinstance(fields[1], bytes):
            raise ProtocolError("Plan: wrong fields")
        fields[1] = tuple(unpack_ranges(fields[1]))
    if cls is NeedLeaves:
        if len(fields) != 2 or not isinstance(fields[1], bytes) or len(fields[1]) % 4:
            raise ProtocolError("NeedLeaves: wrong fields")
        fields[1] = tuple(g for (g,) in struct.iter_unpack("<I", fields[1]))
    try:
        return cls(*fields)
    except TypeError:
        raise ProtocolError(f"{cls.__name__}: wrong number of fields ({len(fields)})") from None
