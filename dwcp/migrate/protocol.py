"""Sans-IO migration protocol: a ``Sender`` and a ``Receiver`` state machine.

Flow: the source sends a signed ``Offer`` (the manifest's summary: hash-tree
parents, and a content id computed from the block fingerprints); the
destination matches it against its image index and asks for the leaves of the
regions it lacks (``NeedLeaves``/``Leaves``), then plans from the index and
answers ``Plan`` (the ranges it still lacks, which on a resumed transfer is
only what is still pending); the source streams delta frames (``Data`` or the
transport's bulk streams), then ``Done`` with counts and the signed whole-image
SHA-256, which it computed while the plan and the data travelled (version 2:
the hash pass is no longer ahead of the first message); the destination
rebuilds, verifies against that SHA-256, fsyncs, renames, indexes and answers
``Ack``.

Each machine is fed events (``handle``) and returns actions; it never touches a
file, a socket or a clock. The glue (``source`` and ``destination``) performs the actions
(plan, write a frame, finish the image, send a message) and feeds their results
back as events. Transitions live in one table per role, as in h11: an event not
in the table for the current state is a protocol error that names both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from dwcp.errors import (
    AuthenticationError,
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
from dwcp.identity import PublicKey
from dwcp.migrate.messages import (
    ERROR_CODES,
    Ack,
    Data,
    Done,
    Error,
    Leaves,
    Message,
    NeedLeaves,
    Offer,
    Plan,
    done_signing_payload,
    offer_signing_payload,
)

# A sender may put at most this much on the wire per pending byte (plus a fixed
# allowance): zstd's worst-case expansion is far below it, so more is abuse.
WIRE_ALLOWANCE = 1 / 16
WIRE_SLACK = 4 * 1024 * 1024


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


# --- events (inputs) ---------------------------------------------------------


class Event:
    """Base of every input to a machine."""


@dataclass(frozen=True)
class Start(Event):
    """Sender: begin (send the offer)."""


@dataclass(frozen=True)
class MessageReceived(Event):
    """A decoded message arrived from the peer."""

    message: Message


@dataclass(frozen=True)
class FrameReceived(Event):
    """Receiver: one delta frame arrived over the bulk streams."""

    frame: bytes


@dataclass(frozen=True)
class LeavesNeeded(Event):
    """Receiver: the summary was matched locally; these groups' leaves are missing."""

    groups: tuple[int, ...]


@dataclass(frozen=True)
class LeavesReady(Event):
    """Sender: the leaves the receiver asked for, encoded."""

    data: bytes


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


# --- actions (outputs) -------------------------------------------------------


class Action:
    """Base of every output of a machine."""


@dataclass(frozen=True)
class SendMessage(Action):
    message: Message


@dataclass(frozen=True)
class ExpectFrames(Action):
    """Receiver glue: data frames follow the plan just sent; start reading the bulk path."""


@dataclass(frozen=True)
class PrepareTransfer(Action):
    """Receiver glue: decode the manifest, open or resume the Rebuilder, plan."""

    offer: Offer


@dataclass(frozen=True)
class AssembleManifest(Action):
    """Receiver glue: complete the manifest from local fingerprints and these leaves, plan."""

    leaves: bytes


@dataclass(frozen=True)
class ProvideLeaves(Action):
    """Sender glue: encode the leaves of ``groups``, then report LeavesReady."""

    groups: tuple[int, ...]


@dataclass(frozen=True)
class WriteFrame(Action):
    frame: bytes


@dataclass(frozen=True)
class FinishTransfer(Action):
    """Receiver glue: finish the Rebuilder (verify against ``sha256``, fsync, rename),
    index the image."""

    sha256: bytes


@dataclass(frozen=True)
class StreamRanges(Action):
    """Sender glue: encode these ranges and send every frame, then report StreamFinished."""

    ranges: tuple[tuple[int, int], ...]


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


class State(Enum):
    IDLE = "idle"
    OFFERED = "offered"  # sender: waiting for the plan
    PREPARING = "preparing"  # receiver: planning
    LEAVES = "leaves"  # receiver: waiting for the leaves it asked for
    STREAMING = "streaming"  # sender: sending frames
    RECEIVING = "receiving"  # receiver: writing frames
    DRAINING = "draining"  # receiver: Done arrived before the last frames
    FINISHING = "finishing"  # sender: Done sent; receiver: verifying
    COMPLETE = "complete"
    FAILED = "failed"


TERMINAL = (State.COMPLETE, State.FAILED)

LINGER_SECONDS = 5.0  # how long the side that sent the final Error waits for the peer's close


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
    """The wire error for a local exception (and whether the partial state is worthless)."""
    text = str(exc)[:4000]
    if isinstance(exc, RemoteError) and exc.code in ERROR_CODES:
        return LocalFailure(exc.code, text)
    if isinstance(exc, DiskFullError):
        return LocalFailure("disk_full", text, discard=True)
    if isinstance(exc, IntegrityError):
        return LocalFailure("integrity", text, discard=True)
    if isinstance(exc, FrameError | ManifestError | ProtocolError):
        return LocalFailure("protocol", text, discard=True)
    if isinstance(exc, UsageError):
        return LocalFailure("refused", text)
    return LocalFailure("io", text)


def _remote_error(msg: Error) -> DwcpError:
    return RemoteError(msg.code, f"the peer stopped the transfer ({msg.code}): {msg.message}")


Handler = Callable[[Any, Any], list[Action]]


class _Machine:
    """Shared plumbing: table dispatch, the failure path, stats."""

    TABLE: ClassVar[dict[tuple[State, str], str]] = {}
    role = ""

    def __init__(self, transfer_id: str) -> None:
        self.transfer_id = transfer_id
        self.state = State.IDLE
        self.error: DwcpError | None = None
        self.ending = Ending.KEEP

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return the actions the glue must perform, in order."""
        if self.state in TERMINAL:
            return []
        key = type(event.message).__name__ if isinstance(event, MessageReceived) else ""
        name = key or type(event).__name__
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
        self.state = State.FAILED
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


def _local_error(ev: LocalFailure) -> DwcpError:
    if ev.code == "image_changed":
        return ImageError(ev.message)
    if ev.code == "integrity":
        return IntegrityError(ev.message)
    if ev.code == "protocol":
        return ProtocolError(ev.message)
    return RemoteError(ev.code, ev.message)


# --- sender ------------------------------------------------------------------


@dataclass
class SenderStats:
    bytes_missing: int = 0
    bytes_local: int = 0
    bytes_zero: int = 0
    bytes_pending: int = 0
    frames: int = 0
    wire_bytes: int = 0


class Sender(_Machine):
    """The source side of one migration."""

    role = "sender"
    TABLE: ClassVar[dict[tuple[State, str], str]] = {
        (State.IDLE, "Start"): "_on_start",
        (State.OFFERED, "Plan"): "_on_plan",
        (State.OFFERED, "NeedLeaves"): "_on_need_leaves",
        (State.OFFERED, "LeavesReady"): "_on_leaves_ready",
        (State.STREAMING, "StreamFinished"): "_on_stream_finished",
        (State.FINISHING, "Ack"): "_on_ack",
    }

    def __init__(self, offer: Offer) -> None:
        super().__init__(offer.transfer_id)
        self.offer = offer
        self.sha256 = b""  # the image's SHA-256, once the glue computed it
        self.stats = SenderStats()
        self._leaves_asked = False

    def _on_start(self, _ev: Start) -> list[Action]:
        self.state = State.OFFERED
        return [SendMessage(self.offer)]

    def _on_need_leaves(self, need: NeedLeaves) -> list[Action]:
        if self._leaves_asked:
            return self._protocol_error("leaves were already asked for")
        self._leaves_asked = True
        return [ProvideLeaves(need.groups)]

    def _on_leaves_ready(self, ev: LeavesReady) -> list[Action]:
        return [SendMessage(Leaves(self.transfer_id, ev.data))]

    def _on_plan(self, plan: Plan) -> list[Action]:
        if plan.missing and plan.missing[-1][0] + plan.missing[-1][1] > self.offer.size:
            return self._protocol_error("the plan asks for bytes beyond the end of the image")
        if plan.bytes_missing > self.offer.size or plan.bytes_pending > self.offer.size:
            return self._protocol_error("the plan's byte counts exceed the image size")
        s = self.stats
        s.bytes_missing, s.bytes_local, s.bytes_zero = (
            plan.bytes_missing,
            plan.bytes_local,
            plan.bytes_zero,
        )
        s.bytes_pending = plan.bytes_pending
        self.state = State.STREAMING
        return [StreamRanges(plan.missing)]

    def _on_stream_finished(self, ev: StreamFinished) -> list[Action]:
        self.stats.frames, self.stats.wire_bytes = ev.frames, ev.wire_bytes
        self.sha256 = ev.sha256
        self.state = State.FINISHING
        done = Done(self.transfer_id, ev.frames, ev.wire_bytes, ev.sha256, ev.signature)
        return [SendMessage(done)]

    def _on_ack(self, ack: Ack) -> list[Action]:
        if ack.sha256 != self.sha256:
            err = IntegrityError(
                f"the destination acknowledged sha256 {ack.sha256.hex()} but the image is "
                f"{self.sha256.hex()}"
            )
            return self._fail(err)
        self.state = State.COMPLETE
        return [Completed(ack.sha256, ack.path_name)]


# --- receiver ----------------------------------------------------------------


@dataclass
class ReceiverStats:
    frames: int = 0
    frames_written: int = 0
    wire_bytes: int = 0
    raw_bytes: int = 0
    bytes_pending: int = 0
    wire_limit: int = 0


@dataclass
class _Expect:
    frames: int = -1
    wire_bytes: int = -1
    done: bool = field(default=False)


class Receiver(_Machine):
    """The destination side of one migration from a known, authenticated peer."""

    role = "receiver"
    TABLE: ClassVar[dict[tuple[State, str], str]] = {
        (State.IDLE, "Offer"): "_on_offer",
        (State.PREPARING, "Prepared"): "_on_prepared",
        (State.PREPARING, "LeavesNeeded"): "_on_leaves_needed",
        (State.LEAVES, "Leaves"): "_on_leaves",
        (State.RECEIVING, "Data"): "_on_data",
        (State.RECEIVING, "FrameReceived"): "_on_data",
        (State.DRAINING, "Data"): "_on_data",
        (State.DRAINING, "FrameReceived"): "_on_data",
        (State.RECEIVING, "FrameWritten"): "_on_written",
        (State.DRAINING, "FrameWritten"): "_on_written",
        (State.RECEIVING, "Done"): "_on_done",
        (State.FINISHING, "Finished"): "_on_finished",
    }

    def __init__(self, peer_key: PublicKey, *, max_image_bytes: int) -> None:
        super().__init__("0" * 32)
        self.peer_key = peer_key
        self.max_image_bytes = max_image_bytes
        self.offer: Offer | None = None
        self.sha256 = b""  # the image's SHA-256, from the sender's signed Done
        self.stats = ReceiverStats()
        self._expect = _Expect()

    def handle(self, event: Event) -> list[Action]:
        # The transfer id is only known from the offer.
        if (
            self.state is State.IDLE
            and isinstance(event, MessageReceived)
            and isinstance(event.message, Offer)
        ):
            self.transfer_id = event.message.transfer_id
        return super().handle(event)

    def _on_offer(self, offer: Offer) -> list[Action]:
        payload = offer_signing_payload(
            offer.transfer_id, offer.name, offer.size, offer.content_id, offer.summary
        )
        try:
            self.peer_key.verify(payload, offer.signature)
        except AuthenticationError as exc:
            return self._refuse(exc, "the offer's signature is bad")
        expected = transfer_id_for(self.peer_key.raw, offer.name, offer.content_id, offer.size)
        if offer.transfer_id != expected:
            return self._protocol_error("the transfer id does not match the offer")
        if offer.size > self.max_image_bytes:
            return self._local_failure(
                LocalFailure(
                    "too_large",
                    f"image of {offer.size} bytes exceeds this node's limit "
                    f"({self.max_image_bytes}; see [limits] max_image_bytes)",
                )
            )
        self.offer = offer
        self.state = State.PREPARING
        return [PrepareTransfer(offer)]

    def _on_leaves_needed(self, ev: LeavesNeeded) -> list[Action]:
        self.state = State.LEAVES
        return [SendMessage(NeedLeaves(self.transfer_id, ev.groups))]

    def _on_leaves(self, leaves: Leaves) -> list[Action]:
        self.state = State.PREPARING
        return [AssembleManifest(leaves.data)]

    def _on_prepared(self, ev: Prepared) -> list[Action]:
        plan = Plan(self.transfer_id, ev.missing, ev.bytes_missing, ev.bytes_local, ev.bytes_zero)
        s = self.stats
        s.bytes_pending = plan.bytes_pending
        s.wire_limit = s.bytes_pending + int(s.bytes_pending * WIRE_ALLOWANCE) + WIRE_SLACK
        self.state = State.RECEIVING
        # The source opens no bulk transfer for an empty plan (see ExpectFrames).
        return [SendMessage(plan), ExpectFrames()] if plan.missing else [SendMessage(plan)]

    def _on_data(self, ev: Data | FrameReceived) -> list[Action]:
        s = self.stats
        s.frames += 1
        s.wire_bytes += len(ev.frame)
        if s.wire_bytes > s.wire_limit:
            return self._protocol_error(
                f"{s.wire_bytes} bytes of frames for {s.bytes_pending} pending bytes"
            )
        if self._expect.done and (
            s.frames > self._expect.frames or s.wire_bytes > self._expect.wire_bytes
        ):
            return self._protocol_error("more frames than the Done message announced")
        return [WriteFrame(ev.frame)]

    def _on_written(self, ev: FrameWritten) -> list[Action]:
        self.stats.raw_bytes += ev.raw_bytes
        self.stats.frames_written += 1
        return self._maybe_finish()

    def _on_done(self, done: Done) -> list[Action]:
        try:
            self.peer_key.verify(
                done_signing_payload(done.transfer_id, done.sha256), done.signature
            )
        except AuthenticationError as exc:
            return self._refuse(exc, "the Done message's signature is bad")
        self.sha256 = done.sha256
        s = self.stats
        if s.frames > done.frames or s.wire_bytes > done.wire_bytes:
            return self._protocol_error("Done announces fewer frames than were received")
        self._expect = _Expect(done.frames, done.wire_bytes, True)
        self.state = State.DRAINING
        return self._maybe_finish()

    def _maybe_finish(self) -> list[Action]:
        s, e = self.stats, self._expect
        if (
            self.state is State.DRAINING
            and s.frames == s.frames_written == e.frames
            and s.wire_bytes == e.wire_bytes
        ):
            self.state = State.FINISHING
            return [FinishTransfer(self.sha256)]
        return []

    def _on_finished(self, ev: Finished) -> list[Action]:
        assert self.offer is not None
        if ev.sha256 != self.sha256:  # the glue verified it; guard the invariant anyway
            return self._local_failure(
                LocalFailure("integrity", "the rebuilt image does not match the manifest", True)
            )
        self.state = State.COMPLETE
        return [
            SendMessage(Ack(self.transfer_id, ev.sha256, ev.path_name)),
            Completed(ev.sha256, ev.path_name),
        ]
