"""What both migration machines share: events, actions, states and the protocol's rules.

Rules kept here, not in the glue: which error code a local failure sends
(``failure_for``), who ends the channel after a failure (``Ending``), how long
the side that sent the final error waits (``LINGER_SECONDS``), and how a
machine dispatches events through its transition table (``Machine``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from dwcp.errors import (
    ConnectionLostError,
    DiskFullError,
    DwcpError,
    FrameError,
    ImageError,
    IntegrityError,
    ManifestError,
    ProtocolError,
    RemoteError,
    UsageError,
)
from dwcp.migrate.messages import ERROR_CODES, PART_KINDS, Error, Message, Offer, Part

# A sender may put at most this much on the wire per pending byte (plus a fixed
# allowance): zstd's worst-case expansion is far below it, so more is abuse.
WIRE_ALLOWANCE = 1 / 16
WIRE_SLACK = 4 * 1024 * 1024
LINGER_SECONDS = 5.0  # how long the side that sent the final Error waits for the peer's close


def transfer_id_for(sender_key: bytes, name: str, content_id: bytes, size: int) -> str:
    """The id both sides derive for "this image, under this name, from this sender".

    The destination recomputes it, so a peer cannot pick an id that touches
    another sender's partial transfer; the same image re-offered after an
    interruption gets the same id and resumes.
    """
    h = hashlib.blake2b(digest_size=16, person=b"dwcp-migrate-id")
    for part in (sender_key, name.encode("utf-8"), content_id, size.to_bytes(8, "little")):
        h.update(len(part).to_bytes(4, "little") + part)
    return h.hexdigest()


# --- events (inputs) ---------------------------------------------------------------


class Event:
    """Base of every input to a machine."""


@dataclass(frozen=True)
class Start(Event):
    """Sender: begin (send the offer and its summary)."""


@dataclass(frozen=True)
class MessageReceived(Event):
    """A decoded message arrived from the peer."""

    message: Message


@dataclass(frozen=True)
class FrameReceived(Event):
    """Receiver: one delta frame arrived over the bulk path."""

    frame: bytes


@dataclass(frozen=True)
class Admitted(Event):
    """Receiver: the glue accepted the offer (name, ownership, memory) and can match
    the summary."""


@dataclass(frozen=True)
class SummaryFed(Event):
    """Receiver: a summary piece was matched; after the last, ``needed`` groups lack leaves."""

    last: bool
    needed: int = 0


@dataclass(frozen=True)
class LeavesFed(Event):
    """Receiver: a leaves piece was merged into the manifest."""

    last: bool


@dataclass(frozen=True)
class LeavesSent(Event):
    """Sender: every leaves piece asked for was sent."""


@dataclass(frozen=True)
class Prepared(Event):
    """Receiver: the glue planned the transfer (fresh or resumed)."""

    missing: tuple[tuple[int, int], ...]
    bytes_missing: int
    bytes_local: int
    bytes_zero: int


@dataclass(frozen=True)
class FrameWritten(Event):
    """Receiver: a frame was decoded and written; ``raw_bytes`` of image data."""

    raw_bytes: int


@dataclass(frozen=True)
class Finished(Event):
    """Receiver: the image was verified, stored and indexed as ``path_name``."""

    sha256: bytes
    path_name: str


@dataclass(frozen=True)
class LocalFailure(Event):
    """Either side: a local step failed; ``code`` from messages.ERROR_CODES."""

    code: str
    message: str
    discard: bool = False  # receiver: drop the partial transfer (bad data)


@dataclass(frozen=True)
class StreamFinished(Event):
    """Sender: every frame of the plan was sent; the image's SHA-256 and its signature
    (``messages.done_signing_payload``) for Done."""

    frames: int
    wire_bytes: int
    sha256: bytes
    signature: bytes


@dataclass(frozen=True)
class ConnectionLost(Event):
    """Either side: the session dropped; the transfer stays resumable."""

    reason: str


# --- actions (outputs) ---------------------------------------------------------------


class Action:
    """Base of every output of a machine."""


@dataclass(frozen=True)
class SendMessage(Action):
    message: Message


@dataclass(frozen=True)
class SendSummary(Action):
    """Sender glue: send the manifest summary as ``Part(SUMMARY)`` pieces, the last marked."""


@dataclass(frozen=True)
class ProvideLeaves(Action):
    """Sender glue: send the leaves of these ``(first group, count)`` runs as
    ``Part(LEAVES)`` pieces, then report ``LeavesSent``."""

    runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class StreamRanges(Action):
    """Sender glue: encode these ranges and send every frame, then report StreamFinished.

    ``ranges`` is flat: offset, length, offset, length, ...
    """

    ranges: array[int]


@dataclass(frozen=True)
class PrepareTransfer(Action):
    """Receiver glue: admit the offer (name, ownership, memory), get ready to match its
    summary; report ``Admitted``."""

    offer: Offer


@dataclass(frozen=True)
class FeedSummary(Action):
    """Receiver glue: match one summary piece; report ``SummaryFed``."""

    data: bytes
    last: bool


@dataclass(frozen=True)
class SendNeed(Action):
    """Receiver glue: send the groups lacking leaves as ``Part(NEED)`` pieces."""


@dataclass(frozen=True)
class FeedLeaves(Action):
    """Receiver glue: merge one leaves piece into the manifest; report ``LeavesFed``."""

    data: bytes
    last: bool


@dataclass(frozen=True)
class AssembleManifest(Action):
    """Receiver glue: complete the manifest, plan, open or resume the Rebuilder; report
    ``Prepared``."""


@dataclass(frozen=True)
class ExpectFrames(Action):
    """Receiver glue: data frames follow the plan just sent; start reading the bulk path."""


@dataclass(frozen=True)
class WriteFrame(Action):
    frame: bytes


@dataclass(frozen=True)
class FinishTransfer(Action):
    """Receiver glue: finish the Rebuilder (verify against ``sha256``, fsync, rename),
    index the image."""

    sha256: bytes


@dataclass(frozen=True)
class Completed(Action):
    """The transfer is done; the image is stored at the destination."""

    sha256: bytes
    path_name: str


@dataclass(frozen=True)
class Failed(Action):
    """The transfer stopped; ``discard`` says whether the partial state is worthless."""

    error: DwcpError
    discard: bool = False


class MigrationState(Enum):
    IDLE = "idle"
    OFFERED = "offered"  # sender: waiting for leaf requests or the plan
    PLANNED = "planned"  # sender: receiving the plan's ranges
    PREPARING = "preparing"  # receiver: admitting or planning
    SUMMARY = "summary"  # receiver: matching the summary's pieces
    LEAVES = "leaves"  # receiver: waiting for the leaves it asked for
    STREAMING = "streaming"  # sender: sending frames
    RECEIVING = "receiving"  # receiver: writing frames
    DRAINING = "draining"  # receiver: Done arrived before the last frames
    FINISHING = "finishing"  # sender: Done sent; receiver: verifying
    COMPLETE = "complete"
    FAILED = "failed"


TERMINAL = (MigrationState.COMPLETE, MigrationState.FAILED)


class Ending(Enum):
    """Who ends the channel once a machine stopped.

    Closing a QUIC session drops data still queued, so the side that sends the
    final ``Error`` lets the side that receives it close: it lingers (reads until
    the peer closes, at most ``LINGER_SECONDS``), the receiving side closes.
    """

    KEEP = "keep"  # completed, or the link is gone: nothing to do
    LINGER = "linger"  # we sent the final Error: wait (bounded) for the peer's close
    CLOSE = "close"  # the peer sent the final Error: close the channel


def failure_for(exc: BaseException) -> LocalFailure:
    """The wire error for a local exception, and whether the partial state is worthless.

    A full disk keeps what was written: the same migration resumes once there is room.
    """
    text = str(exc)[:4000]
    if isinstance(exc, RemoteError) and exc.code in ERROR_CODES:
        return LocalFailure(exc.code, text)
    if isinstance(exc, DiskFullError):
        return LocalFailure("disk_full", text)
    if isinstance(exc, IntegrityError):
        return LocalFailure("integrity", text, discard=True)
    if isinstance(exc, FrameError | ManifestError | ProtocolError):
        return LocalFailure("protocol", text, discard=True)
    if isinstance(exc, UsageError):
        return LocalFailure("refused", text)
    return LocalFailure("io", text)


def _remote_error(msg: Error) -> DwcpError:
    return RemoteError(msg.code, f"the peer stopped the transfer ({msg.code}): {msg.message}")


def _local_error(ev: LocalFailure) -> DwcpError:
    if ev.code == "image_changed":
        return ImageError(ev.message)
    if ev.code == "integrity":
        return IntegrityError(ev.message)
    if ev.code == "protocol":
        return ProtocolError(ev.message)
    return RemoteError(ev.code, ev.message)


def event_name(event: Event) -> str:
    """The transition-table key of an event: the message type (``Part:kind`` for parts)."""
    if isinstance(event, MessageReceived):
        m = event.message
        if isinstance(m, Part):
            return f"Part:{PART_KINDS[m.kind]}"
        return type(m).__name__
    return type(event).__name__


Handler = Callable[[Any, Any], list[Action]]


class Machine:
    """Shared plumbing: table dispatch, the failure path."""

    TABLE: ClassVar[dict[tuple[MigrationState, str], str]] = {}
    role = ""

    def __init__(self, transfer_id: str) -> None:
        self.transfer_id = transfer_id
        self.state = MigrationState.IDLE
        self.error: DwcpError | None = None
        self.ending = Ending.KEEP

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return the actions the glue must perform, in order."""
        if self.state in TERMINAL:
            return []
        name = event_name(event)
        if isinstance(event, MessageReceived) and event.message.transfer_id != self.transfer_id:
            return self._protocol_error(f"message for transfer {event.message.transfer_id}")
        if isinstance(event, MessageReceived) and isinstance(event.message, Error):
            # A changed source image is never offered again under this id: drop its data.
            discard = event.message.code == "image_changed"
            self.ending = Ending.CLOSE
            return self._fail(_remote_error(event.message), discard=discard)
        if isinstance(event, ConnectionLost):
            return self._fail(ConnectionLostError(f"connection lost: {event.reason}"))
        if isinstance(event, LocalFailure):
            return self._local_failure(event)
        method = self.TABLE.get((self.state, name))
        if method is None:
            if isinstance(event, MessageReceived):
                return self._protocol_error(f"{name} not allowed in state {self.state.value}")
            raise ProtocolError(
                f"{self.role}: event {name} not allowed in state {self.state.value}"
            )
        handler: Handler = getattr(type(self), method)
        return handler(self, event.message if isinstance(event, MessageReceived) else event)

    def _fail(self, error: DwcpError, *, discard: bool = False) -> list[Action]:
        self.state = MigrationState.FAILED
        self.error = error
        return [Failed(error, discard)]

    def _protocol_error(self, detail: str) -> list[Action]:
        err = ProtocolError(f"{self.role}: the peer broke the migration protocol: {detail}")
        self.ending = Ending.LINGER
        return [SendMessage(Error(self.transfer_id, "protocol", str(err)[:4000])), *self._fail(err)]

    def _refuse(self, error: DwcpError, text: str) -> list[Action]:
        self.ending = Ending.LINGER
        return [SendMessage(Error(self.transfer_id, "refused", text)), *self._fail(error)]

    def _local_failure(self, ev: LocalFailure) -> list[Action]:
        err = _local_error(ev)
        send = SendMessage(Error(self.transfer_id, ev.code, ev.message[:4000]))
        self.ending = Ending.LINGER
        return [send, *self._fail(err, discard=ev.discard)]
