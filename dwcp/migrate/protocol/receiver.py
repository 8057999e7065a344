"""The destination's machine: admit the offer, match the summary, ask for leaves, plan,
receive, finish."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dwcp.delta.manifest import content_id_of
from dwcp.delta.summary import SummaryHeader
from dwcp.errors import AuthenticationError, ManifestError
from dwcp.identity import PublicKey
from dwcp.migrate.messages import (
    MAX_PART,
    RANGES,
    Ack,
    Data,
    Done,
    Offer,
    Part,
    PlanHeader,
    done_signing_payload,
    pack_ranges,
)
from dwcp.migrate.protocol.core import (
    WIRE_ALLOWANCE,
    WIRE_SLACK,
    Action,
    Admitted,
    AssembleManifest,
    Completed,
    Event,
    ExpectFrames,
    FeedLeaves,
    FeedSummary,
    Finished,
    FinishTransfer,
    FrameReceived,
    FrameWritten,
    LeavesFed,
    LocalFailure,
    Machine,
    MessageReceived,
    MigrationState,
    Prepared,
    PrepareTransfer,
    SendMessage,
    SendNeed,
    SummaryFed,
    WriteFrame,
    transfer_id_for,
)

RANGES_PER_PART = MAX_PART // 16
MiB = 1 << 20


def header_of(offer: Offer) -> SummaryHeader:
    return SummaryHeader(
        offer.size, offer.block_size, offer.nonzero_blocks, offer.runs, offer.entries, offer.root
    )


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


class Receiver(Machine):
    """The destination side of one migration from a known, authenticated peer.

    Before the glue holds anything for an offer, the offer's own counts say how
    much memory its manifest needs (``SummaryHeader.memory``); an offer over
    ``max_transfer_memory`` is refused (``too_large``) with the figure.
    """

    role = "receiver"
    TABLE: ClassVar[dict[tuple[MigrationState, str], str]] = {
        (MigrationState.IDLE, "Offer"): "_on_offer",
        (MigrationState.PREPARING, "Admitted"): "_on_admitted",
        (MigrationState.SUMMARY, "Part:summary"): "_on_summary",
        (MigrationState.SUMMARY, "SummaryFed"): "_on_summary_fed",
        (MigrationState.LEAVES, "Part:leaves"): "_on_leaves",
        (MigrationState.LEAVES, "LeavesFed"): "_on_leaves_fed",
        (MigrationState.PREPARING, "Prepared"): "_on_prepared",
        (MigrationState.RECEIVING, "Data"): "_on_data",
        (MigrationState.RECEIVING, "FrameReceived"): "_on_data",
        (MigrationState.DRAINING, "Data"): "_on_data",
        (MigrationState.DRAINING, "FrameReceived"): "_on_data",
        (MigrationState.RECEIVING, "FrameWritten"): "_on_written",
        (MigrationState.DRAINING, "FrameWritten"): "_on_written",
        (MigrationState.RECEIVING, "Done"): "_on_done",
        (MigrationState.FINISHING, "Finished"): "_on_finished",
    }

    def __init__(
        self, peer_key: PublicKey, *, max_image_bytes: int, max_transfer_memory: int = 1 << 62
    ) -> None:
        super().__init__("0" * 32)
        self.peer_key = peer_key
        self.max_image_bytes = max_image_bytes
        self.max_transfer_memory = max_transfer_memory
        self.offer: Offer | None = None
        self.sha256 = b""  # the image's SHA-256, from the sender's signed Done
        self.stats = ReceiverStats()
        self._expect = _Expect()

    def handle(self, event: Event) -> list[Action]:
        # The transfer id is only known from the offer.
        if (
            self.state is MigrationState.IDLE
            and isinstance(event, MessageReceived)
            and isinstance(event.message, Offer)
        ):
            self.transfer_id = event.message.transfer_id
        return super().handle(event)

    def _on_offer(self, offer: Offer) -> list[Action]:
        try:
            self.peer_key.verify(offer.signing_payload(), offer.signature)
        except AuthenticationError as exc:
            return self._refuse(exc, "the offer's signature is bad")
        expected = transfer_id_for(self.peer_key.raw, offer.name, offer.content_id, offer.size)
        if offer.transfer_id != expected:
            return self._protocol_error("the transfer id does not match the offer")
        header = header_of(offer)
        if offer.content_id != content_id_of(
            offer.size, offer.block_size, offer.nonzero_blocks, offer.root
        ):
            return self._protocol_error("the content id does not match the offer's manifest")
        if offer.size > self.max_image_bytes:
            return self._too_large(
                f"image of {offer.size} bytes exceeds this node's limit "
                f"({self.max_image_bytes}; see [limits] max_image_bytes)"
            )
        try:
            header.check(self.max_image_bytes)
        except ManifestError as exc:
            return self._protocol_error(str(exc))
        if header.memory > self.max_transfer_memory:
            return self._too_large(
                f"planning this image needs {header.memory / MiB:.1f} MiB of memory "
                f"({offer.nonzero_blocks} non-zero blocks in {offer.runs} runs); this node "
                f"allows {self.max_transfer_memory / MiB:.1f} MiB per incoming transfer "
                "([limits] transfer_memory)"
            )
        self.offer = offer
        self.state = MigrationState.PREPARING
        return [PrepareTransfer(offer)]

    def _too_large(self, text: str) -> list[Action]:
        return self._local_failure(LocalFailure("too_large", text))

    def _on_admitted(self, _ev: Admitted) -> list[Action]:
        self.state = MigrationState.SUMMARY
        return []

    def _on_summary(self, part: Part) -> list[Action]:
        return [FeedSummary(part.data, part.last)]

    def _on_summary_fed(self, ev: SummaryFed) -> list[Action]:
        if not ev.last:
            return []
        if ev.needed:
            self.state = MigrationState.LEAVES
            return [SendNeed()]
        self.state = MigrationState.PREPARING
        return [AssembleManifest()]

    def _on_leaves(self, part: Part) -> list[Action]:
        return [FeedLeaves(part.data, part.last)]

    def _on_leaves_fed(self, ev: LeavesFed) -> list[Action]:
        if not ev.last:
            return []
        self.state = MigrationState.PREPARING
        return [AssembleManifest()]

    def _on_prepared(self, ev: Prepared) -> list[Action]:
        pending = sum(n for _, n in ev.missing)
        plan = PlanHeader(
            self.transfer_id, ev.bytes_missing, ev.bytes_local, ev.bytes_zero, pending
        )
        s = self.stats
        s.bytes_pending = pending
        s.wire_limit = pending + int(pending * WIRE_ALLOWANCE) + WIRE_SLACK
        self.state = MigrationState.RECEIVING
        out: list[Action] = [SendMessage(plan)]
        ranges = ev.missing
        for i in range(0, max(len(ranges), 1), RANGES_PER_PART):
            piece = pack_ranges(list(ranges[i : i + RANGES_PER_PART]))
            last = i + RANGES_PER_PART >= len(ranges)
            out.append(SendMessage(Part(self.transfer_id, RANGES, last, piece)))
        # The source opens no bulk transfer for an empty plan.
        return [*out, ExpectFrames()] if ranges else out

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
        self.state = MigrationState.DRAINING
        return self._maybe_finish()

    def _maybe_finish(self) -> list[Action]:
        s, e = self.stats, self._expect
        if (
            self.state is MigrationState.DRAINING
            and s.frames == s.frames_written == e.frames
            and s.wire_bytes == e.wire_bytes
        ):
            self.state = MigrationState.FINISHING
            return [FinishTransfer(self.sha256)]
        return []

    def _on_finished(self, ev: Finished) -> list[Action]:
        assert self.offer is not None
        if ev.sha256 != self.sha256:  # the glue verified it; guard the invariant anyway
            return self._local_failure(
                LocalFailure("integrity", "the rebuilt image does not match the manifest", True)
            )
        self.state = MigrationState.COMPLETE
        return [
            SendMessage(Ack(self.transfer_id, ev.sha256, ev.path_name)),
            Completed(ev.sha256, ev.path_name),
        ]
