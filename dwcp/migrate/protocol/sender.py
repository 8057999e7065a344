"""The source's machine: offer, answer leaf requests, take the plan, stream, finish."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import ClassVar

from dwcp.delta.manifest import n_groups
from dwcp.errors import IntegrityError, ManifestError, ProtocolError
from dwcp.migrate.messages import MAX_RANGES, Ack, Done, Offer, Part, PlanHeader, unpack_ranges
from dwcp.migrate.protocol.core import (
    Action,
    Completed,
    LeavesSent,
    Machine,
    MigrationState,
    ProvideLeaves,
    SendMessage,
    SendSummary,
    Start,
    StreamFinished,
    StreamRanges,
)


@dataclass
class SenderStats:
    bytes_missing: int = 0
    bytes_local: int = 0
    bytes_zero: int = 0
    bytes_pending: int = 0
    frames: int = 0
    wire_bytes: int = 0


def _need_runs(data: bytes) -> list[tuple[int, int]]:
    from dwcp.delta.summary import parse_runs

    try:
        return parse_runs(data)
    except ManifestError as exc:
        raise ProtocolError(str(exc)) from None


class Sender(Machine):
    """The source side of one migration.

    What the destination sends is checked against the offer before the glue acts
    on it: leaf requests name groups of the image, at most as many as the summary
    listed; the plan's ranges are sorted, inside the image, add up to what the plan
    header says and number at most ``MAX_RANGES``. So the source holds at most
    a summary's worth of requests and 16 bytes per range.
    """

    role = "sender"
    TABLE: ClassVar[dict[tuple[MigrationState, str], str]] = {
        (MigrationState.IDLE, "Start"): "_on_start",
        (MigrationState.OFFERED, "Part:need"): "_on_need",
        (MigrationState.OFFERED, "LeavesSent"): "_on_leaves_sent",
        (MigrationState.OFFERED, "PlanHeader"): "_on_plan",
        (MigrationState.PLANNED, "Part:ranges"): "_on_ranges",
        (MigrationState.STREAMING, "StreamFinished"): "_on_stream_finished",
        (MigrationState.FINISHING, "Ack"): "_on_ack",
    }

    def __init__(self, offer: Offer) -> None:
        super().__init__(offer.transfer_id)
        self.offer = offer
        self.sha256 = b""  # the image's SHA-256, once the glue computed it
        self.stats = SenderStats()
        self._groups = n_groups(offer.size, offer.block_size)
        self._need: list[tuple[int, int]] = []
        self._need_end = 0  # groups before this one were requested or skipped
        self._need_total = 0
        self._leaves = "no"  # "no", "asked" (being sent), "sent"
        self._ranges: array[int] = array("Q")
        self._ranges_end = 0
        self._ranges_bytes = 0

    def _on_start(self, _ev: Start) -> list[Action]:
        self.state = MigrationState.OFFERED
        return [SendMessage(self.offer), SendSummary()]

    def _on_need(self, part: Part) -> list[Action]:
        if self._leaves != "no":
            return self._protocol_error("leaves were already asked for")
        try:
            runs = _need_runs(part.data)
        except ProtocolError as exc:
            return self._protocol_error(str(exc))
        for first, count in runs:
            if count < 1 or first < self._need_end or first + count > self._groups:
                return self._protocol_error("leaf requests are out of order or past the image")
            self._need_end = first + count
            self._need_total += count
            if self._need_total > self.offer.entries:
                return self._protocol_error("more leaves asked for than the summary listed")
            self._need.append((first, count))
        if not part.last:
            return []
        self._leaves = "asked"
        need, self._need = tuple(self._need), []
        return [ProvideLeaves(need)]

    def _on_leaves_sent(self, _ev: LeavesSent) -> list[Action]:
        self._leaves = "sent"
        return []

    def _on_plan(self, plan: PlanHeader) -> list[Action]:
        size = self.offer.size
        if plan.bytes_missing > size or plan.bytes_pending > plan.bytes_missing:
            return self._protocol_error("the plan's byte counts exceed the image size")
        if self._leaves == "asked":
            return self._protocol_error("the plan came before the leaves asked for were sent")
        s = self.stats
        s.bytes_missing, s.bytes_local, s.bytes_zero = (
            plan.bytes_missing,
            plan.bytes_local,
            plan.bytes_zero,
        )
        s.bytes_pending = plan.bytes_pending
        self.state = MigrationState.PLANNED
        return []

    def _on_ranges(self, part: Part) -> list[Action]:
        try:
            got = unpack_ranges(part.data, self._ranges_end)
        except ProtocolError as exc:
            return self._protocol_error(str(exc))
        if len(self._ranges) // 2 + len(got) > MAX_RANGES:
            return self._protocol_error(f"the plan lists more than {MAX_RANGES} ranges")
        for off, n in got:
            self._ranges.append(off)
            self._ranges.append(n)
            self._ranges_bytes += n
        if got:
            self._ranges_end = got[-1][0] + got[-1][1]
        if self._ranges_end > self.offer.size:
            return self._protocol_error("the plan asks for bytes beyond the end of the image")
        if self._ranges_bytes > self.stats.bytes_pending:
            return self._protocol_error("the plan's ranges add up to more than it announced")
        if not part.last:
            return []
        if self._ranges_bytes != self.stats.bytes_pending:
            return self._protocol_error("the plan's ranges do not add up to what it announced")
        self.state = MigrationState.STREAMING
        ranges, self._ranges = self._ranges, array("Q")
        return [StreamRanges(ranges)]

    def _on_stream_finished(self, ev: StreamFinished) -> list[Action]:
        self.stats.frames, self.stats.wire_bytes = ev.frames, ev.wire_bytes
        self.sha256 = ev.sha256
        self.state = MigrationState.FINISHING
        done = Done(self.transfer_id, ev.frames, ev.wire_bytes, ev.sha256, ev.signature)
        return [SendMessage(done)]

    def _on_ack(self, ack: Ack) -> list[Action]:
        if ack.sha256 != self.sha256:
            err = IntegrityError(
                f"the destination acknowledged sha256 {ack.sha256.hex()} but the image is "
                f"{self.sha256.hex()}"
            )
            return self._fail(err)
        self.state = MigrationState.COMPLETE
        return [Completed(ack.sha256, ack.path_name)]
