"""What the sans-IO session core reports: stream kinds, stream keys and session events.

``SessionCore.receive`` turns a QUIC stream's data into a list of these, as
aioquic's h3 layer turns QUIC events into H3 events. Each is a plain frozen
dataclass so tests compare them by equality.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from dwcp.errors import FrameError


class StreamKind(enum.Enum):
    """What a stream carries, decided by its first frame (or by who opened it)."""

    UNKNOWN = "unknown"  # no complete frame yet
    CONTROL = "control"  # the client's first stream of a connection: Hello, then bulk control
    REQUEST = "request"  # the peer's request; the response goes back on it
    AWAITING = "awaiting"  # our request, waiting for the response
    CHANNEL = "channel"  # raw bytes after a ChannelOpen frame
    LANE = "lane"  # BulkData frames of any transfer
    DONE = "done"  # nothing more is expected; late data is dropped (a cancelled request)


class StreamKey(NamedTuple):
    """A stream of the session: connection index (0 is the primary) and QUIC stream id."""

    conn: int
    stream: int


class SessionEvent:
    """Base class of every session event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class RequestReceived(SessionEvent):
    """The peer asks; answer with ``SessionCore.send_response(stream, ...)``."""

    stream: StreamKey
    body: bytes


@dataclass(frozen=True, slots=True)
class ResponseReceived(SessionEvent):
    """The peer's handler answered our request on ``stream``."""

    stream: StreamKey
    body: bytes


@dataclass(frozen=True, slots=True)
class RequestFailed(SessionEvent):
    """The peer's handler failed on our request: ``code`` names why, ``message`` says it."""

    stream: StreamKey
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class StreamReset(SessionEvent):
    """The peer reset a request or channel stream (a channel reads it as end of stream)."""

    stream: StreamKey
    kind: StreamKind


@dataclass(frozen=True, slots=True)
class ChannelOpened(SessionEvent):
    """The peer opened channel ``name``; its bytes follow as ``ChannelData``."""

    stream: StreamKey
    name: str


@dataclass(frozen=True, slots=True)
class ChannelData(SessionEvent):
    """Bytes of a channel, in order; ``end_stream`` once the peer wrote its end."""

    stream: StreamKey
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class BulkStarted(SessionEvent):
    """The peer started bulk transfer ``transfer_id`` (read it with ``bulk_read``)."""

    transfer_id: int


@dataclass(frozen=True, slots=True)
class BulkReadable(SessionEvent):
    """In-order data, or the end, of incoming transfer ``transfer_id`` can be read."""

    transfer_id: int


@dataclass(frozen=True, slots=True)
class BulkAcked(SessionEvent):
    """The peer's application consumed outgoing transfer ``transfer_id`` up to ``offset``;
    ``complete`` once that is its announced end."""

    transfer_id: int
    offset: int
    complete: bool


@dataclass(frozen=True, slots=True)
class PeerClosed(SessionEvent):
    """The peer closed the session on purpose (a Close frame)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolError(SessionEvent):
    """The peer broke the protocol; the core is failed and ignores further input."""

    error: FrameError
