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
# 3: messages framed by dwcp.framing (u32 length in network byte order); the summary,
#    the leaf requests, the leaves and the plan's ranges travel as bounded Part messages
VERSION = 3
MAX_PART = 256 * 1024  # the most one Part carries (dwcp.delta.summary.PART_BYTES)
MAX_FRAME = 32 * 1024 * 1024  # the largest data frame accepted (frames are ~1 MiB)
MAX_MESSAGE = MAX_FRAME + 4096  # the largest encoded message accepted (a Data message)
MAX_RANGES = 1 << 20  # missing ranges in one plan (16 MiB at the source)
MAX_TEXT = 4096
_TID_RE = re.compile(r"^[0-9a-f]{32}$")
_RANGE = struct.Struct("<QQ")
SIGNING_CONTEXT = b"dwcp-migrate-offer-v3\x00"
DONE_SIGNING_CONTEXT = b"dwcp-migrate-done-v3\x00"


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


def unpack_ranges(data: bytes, after: int = 0) -> list[tuple[int, int]]:
    """Unpack ranges, checking they are non-empty, sorted, disjoint and start at or
    after ``after`` (the end of the previous piece's last range)."""
    if len(data) % _RANGE.size:
        raise ProtocolError("range list: bad length")
    out: list[tuple[int, int]] = []
    end = after
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


REFUSE, FORCE, BACKUP = 0, 1, 2  # Offer.replace


@dataclass(frozen=True)
class Offer(Message):
    """Source -> destination: the signed description of the image's manifest.

    The summary (the hash tree's 1 MiB parents of the groups holding data) follows as
    ``Part(SUMMARY)`` pieces whose SHA-256 the offer signs; the counts let the
    destination know the manifest's memory before it accepts anything. ``content_id``
    (``dwcp.delta.content_id``: size, block size, non-zero blocks and tree root) names
    the image as soon as it is fingerprinted; the whole-image SHA-256, one more pass
    over the image, is computed while the data flows and arrives signed in ``Done``.
    """

    TYPE: ClassVar[int] = 1
    transfer_id: str
    name: str
    size: int
    block_size: int
    nonzero_blocks: int
    runs: int
    entries: int
    root: bytes
    content_id: bytes
    summary_sha256: bytes
    replace: int  # REFUSE, FORCE or BACKUP: what to do with a different stored image
    origin: bytes  # names the source's file (16 bytes): a later version comes from it too
    backing: str  # qcow2: the backing file the image needs, or ""
    signature: bytes

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        _check_text("name", self.name, 255)
        if self.replace not in (REFUSE, FORCE, BACKUP):
            raise ProtocolError(f"Offer.replace: unknown mode {self.replace!r}")
        _check_bytes("origin", self.origin, 16, 16)
        _check_text("backing", self.backing, 1023)
        for f in ("size", "block_size", "nonzero_blocks", "runs", "entries"):
            _check_int(f, getattr(self, f))
        _check_bytes("root", self.root, 16, 16)
        _check_bytes("content_id", self.content_id, 32, 32)
        _check_bytes("summary_sha256", self.summary_sha256, 32, 32)
        _check_bytes("signature", self.signature, 64, 64)

    def fields(self) -> list[Any]:
        return [*self._signed(), self.signature]

    def _signed(self) -> list[Any]:
        return [
            self.transfer_id,
            self.name,
            self.size,
            self.block_size,
            self.nonzero_blocks,
            self.runs,
            self.entries,
            self.root,
            self.content_id,
            self.summary_sha256,
            self.replace,
            self.origin,
            self.backing,
        ]

    def signing_payload(self) -> bytes:
        """What the source signs: every field but the signature, unambiguously encoded."""
        return SIGNING_CONTEXT + msgpack.packb(self._signed(), use_bin_type=True)


def done_signing_payload(transfer_id: str, sha256: bytes) -> bytes:
    """What the source signs when it ends: the transfer and the image's SHA-256."""
    return DONE_SIGNING_CONTEXT + msgpack.packb([transfer_id, sha256], use_bin_type=True)


@dataclass(frozen=True)
class PlanHeader(Message):
    """Destination -> source: what it already had; the ranges it still needs follow as
    ``Part(RANGES)`` pieces (``bytes_pending`` in all)."""

    TYPE: ClassVar[int] = 2
    transfer_id: str
    bytes_missing: int  # total missing for the whole image (first plan)
    bytes_local: int  # found in local images
    bytes_zero: int  # zero blocks
    bytes_pending: int  # what the ranges add up to (less than bytes_missing on a resume)

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        for name in ("bytes_missing", "bytes_local", "bytes_zero", "bytes_pending"):
            _check_int(name, getattr(self, name))

    def fields(self) -> list[Any]:
        return [
            self.transfer_id,
            self.bytes_missing,
            self.bytes_local,
            self.bytes_zero,
            self.bytes_pending,
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


SUMMARY, NEED, LEAVES, RANGES = 1, 2, 3, 4
PART_KINDS = {SUMMARY: "summary", NEED: "need", LEAVES: "leaves", RANGES: "ranges"}


@dataclass(frozen=True)
class Part(Message):
    """Either way: one bounded piece of a larger object; ``last`` ends it.

    ``SUMMARY`` (source: summary entries), ``NEED`` (destination: the groups whose
    leaves it lacks, as runs), ``LEAVES`` (source: leaves records), ``RANGES``
    (destination: the byte ranges still missing, ``pack_ranges``).
    """

    TYPE: ClassVar[int] = 9
    transfer_id: str
    kind: int
    last: bool
    data: bytes

    def __post_init__(self) -> None:
        _check_tid(self.transfer_id)
        if self.kind not in PART_KINDS:
            raise ProtocolError(f"unknown part kind {self.kind!r}")
        if not isinstance(self.last, bool):
            raise ProtocolError("Part.last: expected a boolean")
        _check_bytes("data", self.data, 0, MAX_PART)

    def fields(self) -> list[Any]:
        return [self.transfer_id, self.kind, self.last, self.data]


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
    m.TYPE: m for m in (Offer, PlanHeader, Data, Done, Ack, Error, Part)
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
            max_array_len=24,
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
    try:
        return cls(*fields)
    except TypeError:
        raise ProtocolError(f"{cls.__name__}: wrong number of fields ({len(fields)})") from None
