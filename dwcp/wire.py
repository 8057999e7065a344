"""Sans-IO DWCP framing: versioned, length-prefixed frames and a decoder.

Every frame is ``magic "DW" | version u8 | type u8 | length u32 | payload``.
One table maps each type to its frame class, its payload bounds and its
parser, as aioquic does for QUIC frames; anything outside the table, a wrong
magic or version, or a length over the cap raises one ``FrameError`` before
the payload is buffered, so a hostile peer cannot make the decoder grow past
``HEADER.size + MAX_PAYLOAD`` bytes. No I/O, no clock: bytes in, frames out.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from dwcp.errors import FrameError, UsageError
from dwcp.version import PROTOCOL_VERSION

MAGIC: Final = b"DW"
VERSION: Final = PROTOCOL_VERSION
HEADER: Final = struct.Struct("!2sBBI")
# Hard caps: one frame never exceeds MAX_PAYLOAD; bulk chunks are smaller
# so a chunk plus its 12-byte header always fits in one frame.
MAX_PAYLOAD: Final = 1 << 20
MAX_CHUNK: Final = MAX_PAYLOAD - 16
MAX_NAME: Final = 255
SESSION_ID_BYTES: Final = 16

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ID_OFF = struct.Struct("!IQ")
_HELLO = struct.Struct(f"!{SESSION_ID_BYTES}sHHQ")


class Frame:
    """Base class of every decoded frame."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """First frame of a connection: which session it joins, as connection ``index`` of at most
    ``count``, and how many unconsumed bulk bytes the sender may have at this node (``window``).
    The server echoes it with its own ``window``."""

    session_id: bytes
    index: int
    count: int
    window: int

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise FrameError(f"session id is {len(self.session_id)} bytes, expected 16")
        if not 0 <= self.index < self.count <= 0xFFFF:
            raise FrameError(f"hello index {self.index} of {self.count} is out of range")
        if not 0 < self.window < 1 << 40:
            raise FrameError(f"hello window {self.window} is out of range")


@dataclass(frozen=True, slots=True)
class Request(Frame):
    """A request body; the response comes back on the same stream."""

    body: bytes


@dataclass(frozen=True, slots=True)
class Response(Frame):
    """The answer to a request; ``ok`` False means ``body`` is a UTF-8 error message."""

    ok: bool
    body: bytes


@dataclass(frozen=True, slots=True)
class ChannelOpen(Frame):
    """Opens an ordered byte channel; raw bytes follow on the same stream."""

    name: str

    def __post_init__(self) -> None:
        if len(self.name.encode()) > MAX_NAME:
            raise FrameError(f"channel name is longer than {MAX_NAME} bytes")


@dataclass(frozen=True, slots=True)
class BulkStart(Frame):
    """Announces bulk transfer ``transfer_id``, whose first byte is at ``offset``."""

    transfer_id: int
    offset: int


@dataclass(frozen=True, slots=True)
class BulkData(Frame):
    """A chunk of a bulk transfer at absolute byte ``offset``; chunks may arrive out of order."""

    transfer_id: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class BulkEnd(Frame):
    """The transfer ends at byte ``end`` (exclusive)."""

    transfer_id: int
    end: int


@dataclass(frozen=True, slots=True)
class BulkAck(Frame):
    """The receiver's application has consumed every byte below ``offset``."""

    transfer_id: int
    offset: int


@dataclass(frozen=True, slots=True)
class Close(Frame):
    """The peer closes the session on purpose and says why."""

    reason: str


# --- encoding -------------------------------------------------------------


def _frame(ftype: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise UsageError(
            f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}; "
            "use a bulk transfer for large data"
        )
    return HEADER.pack(MAGIC, VERSION, ftype, len(payload)) + payload


def bulk_data_header(transfer_id: int, offset: int, size: int) -> bytes:
    """Header of a BulkData frame carrying ``size`` bytes, so callers can avoid a copy."""
    if size > MAX_CHUNK:
        raise UsageError(f"bulk chunk of {size} bytes exceeds {MAX_CHUNK}")
    return HEADER.pack(MAGIC, VERSION, T_BULK_DATA, 12 + size) + _ID_OFF.pack(transfer_id, offset)


def encode(frame: Frame) -> bytes:
    """Serialise one frame."""
    if isinstance(frame, BulkData):
        return bulk_data_header(frame.transfer_id, frame.offset, len(frame.data)) + frame.data
    if isinstance(frame, Hello):
        return _frame(
            T_HELLO, _HELLO.pack(frame.session_id, frame.index, frame.count, frame.window)
        )
    if isinstance(frame, Request):
        return _frame(T_REQUEST, frame.body)
    if isinstance(frame, Response):
        return _frame(T_RESPONSE, (b"\x01" if frame.ok else b"\x00") + frame.body)
    if isinstance(frame, ChannelOpen):
        return _frame(T_CHANNEL_OPEN, frame.name.encode())
    if isinstance(frame, BulkStart):
        return _frame(T_BULK_START, _ID_OFF.pack(frame.transfer_id, frame.offset))
    if isinstance(frame, BulkEnd):
        return _frame(T_BULK_END, _ID_OFF.pack(frame.transfer_id, frame.end))
    if isinstance(frame, BulkAck):
        return _frame(T_BULK_ACK, _ID_OFF.pack(frame.transfer_id, frame.offset))
    if isinstance(frame, Close):
        return _frame(T_CLOSE, frame.reason.encode()[:MAX_NAME])
    raise UsageError(f"cannot encode {type(frame).__name__}")


# --- decoding -------------------------------------------------------------


def _p_hello(p: bytes) -> Frame:
    return Hello(*_HELLO.unpack(p))


def _p_request(p: bytes) -> Frame:
    return Request(p)


def _p_response(p: bytes) -> Frame:
    if p[0] > 1:
        raise FrameError(f"response status byte {p[0]} is not 0 or 1")
    return Response(p[0] == 1, p[1:])


def _p_channel_open(p: bytes) -> Frame:
    try:
        return ChannelOpen(p.decode())
    except UnicodeDecodeError as exc:
        raise FrameError("channel name is not UTF-8") from exc


def _p_bulk_start(p: bytes) -> Frame:
    return BulkStart(*_ID_OFF.unpack(p))


def _p_bulk_data(p: bytes) -> Frame:
    tid, off = _ID_OFF.unpack_from(p)
    return BulkData(tid, off, p[12:])


def _p_bulk_end(p: bytes) -> Frame:
    return BulkEnd(*_ID_OFF.unpack(p))


def _p_bulk_ack(p: bytes) -> Frame:
    return BulkAck(*_ID_OFF.unpack(p))


def _p_close(p: bytes) -> Frame:
    return Close(p.decode(errors="replace"))


T_HELLO, T_REQUEST, T_RESPONSE, T_CHANNEL_OPEN = 1, 2, 3, 4
T_BULK_START, T_BULK_DATA, T_BULK_END, T_BULK_ACK, T_CLOSE = 5, 6, 7, 8, 9

# type -> (name, min payload, max payload, parser)
FRAME_TYPES: Final[dict[int, tuple[str, int, int, Callable[[bytes], Frame]]]] = {
    T_HELLO: ("HELLO", _HELLO.size, _HELLO.size, _p_hello),
    T_REQUEST: ("REQUEST", 0, MAX_PAYLOAD, _p_request),
    T_RESPONSE: ("RESPONSE", 1, MAX_PAYLOAD, _p_response),
    T_CHANNEL_OPEN: ("CHANNEL_OPEN", 0, MAX_NAME, _p_channel_open),
    T_BULK_START: ("BULK_START", 12, 12, _p_bulk_start),
    T_BULK_DATA: ("BULK_DATA", 12, 12 + MAX_CHUNK, _p_bulk_data),
    T_BULK_END: ("BULK_END", 12, 12, _p_bulk_end),
    T_BULK_ACK: ("BULK_ACK", 12, 12, _p_bulk_ack),
    T_CLOSE: ("CLOSE", 0, MAX_NAME, _p_close),
}


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, get whole frames back.

    After a ``FrameError`` the decoder is failed and rejects further input
    (the caller closes the stream). ``detach`` hands back unparsed bytes when
    a stream switches to raw mode (channels).
    """

    __slots__ = ("_buf", "_failed", "_need")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._failed = False
        self._need = HEADER.size  # bytes needed before parsing can progress

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame (never above the frame cap)."""
        return len(self._buf)

    def feed(self, data: bytes, *, limit: int = -1) -> list[Frame]:
        """Add ``data``; return complete frames (at most ``limit`` if >= 0)."""
        if self._failed:
            raise FrameError("decoder already failed on malformed input; close the stream")
        buf = self._buf
        buf += data
        n = len(buf)
        if n < self._need:
            return []  # fast path: the middle of a large frame
        frames: list[Frame] = []
        pos = 0
        self._need = HEADER.size
        try:
            while n - pos >= HEADER.size and len(frames) != limit:
                magic, version, ftype, length = HEADER.unpack_from(buf, pos)
                if magic != MAGIC:
                    raise FrameError(f"bad frame magic {bytes(magic)!r}; the peer is not DWCP")
                if version != VERSION:
                    raise FrameError(
                        f"frame version {version}, this node speaks {VERSION}; upgrade a node"
                    )
                entry = FRAME_TYPES.get(ftype)
                if entry is None:
                    raise FrameError(f"unknown frame type {ftype}")
                name, lo, hi, parse = entry
                if not lo <= length <= hi:
                    raise FrameError(f"{name} frame length {length} outside [{lo}, {hi}]")
                end = pos + HEADER.size + length
                if end > n:
                    self._need = end - pos
                    break
                frames.append(parse(bytes(buf[pos + HEADER.size : end])))
                pos = end
        except (FrameError, struct.error, IndexError) as exc:
            self._failed = True
            self._buf = bytearray()
            if isinstance(exc, FrameError):
                raise
            raise FrameError(f"malformed frame: {exc}") from exc
        if pos:
            del buf[:pos]
        return frames

    def detach(self) -> bytes:
        """Return and forget any bytes not yet parsed."""
        rest = bytes(self._buf)
        self._buf = bytearray()
        self._need = HEADER.size
        return rest
