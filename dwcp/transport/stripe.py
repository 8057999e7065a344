"""Sans-IO striping of one bulk transfer over many lanes, and in-order reassembly.

The sender cuts the byte sequence into chunks at absolute offsets and may put
each on any lane (QUIC stream); a lane is ordered, lanes are not. The
receiver's ``Reassembler`` holds early chunks until the gap before them is
filled, and hands out data strictly in order. Memory is bounded on both sides
by one window: the sender never sends past ``acked + window`` (``SendWindow``),
and the receiver refuses more than ``window`` buffered bytes (a peer that
ignores the window gets a ``FrameError``). ``acked`` is what the receiving
application has consumed, which is also where a resumed transfer restarts.
``pick_lane`` chooses the lane for the next chunk from the lanes' loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dwcp.errors import FrameError, UsageError


@dataclass(frozen=True, slots=True)
class ConnLoad:
    """One connection's lanes as the lane chooser sees them."""

    window: int  # congestion window, bytes
    unsent: Sequence[int]  # bytes written and not yet sent, per lane of this connection


def pick_lane(conns: Sequence[ConnLoad], floor: int) -> tuple[int, int] | None:
    """The (connection, lane) positions that will send a new chunk soonest; None if all full.

    Each connection may have about one congestion window (at least ``floor``)
    of data waiting to be sent; the chunk goes to the connection with the least
    waiting data relative to its window, on its least-loaded lane. Striping in
    proportion to each connection's speed keeps the receiver's reassembly gaps
    near one RTT of data; equal shares would let a slow connection hold the
    whole window hostage.
    """
    best: tuple[int, int] | None = None
    best_score = 0.0
    for ci, conn in enumerate(conns):
        if not conn.unsent:
            continue
        allowed = max(conn.window, floor)
        total = sum(conn.unsent)
        if total >= allowed:
            continue
        score = total / allowed
        if best is None or score < best_score:
            best = (ci, list(conn.unsent).index(min(conn.unsent)))
            best_score = score
    return best


class SendWindow:
    """Sender-side accounting: which offsets may be sent now."""

    __slots__ = ("acked", "next_offset", "window")

    def __init__(self, start: int, window: int) -> None:
        if window <= 0:
            raise UsageError("the bulk window must be positive")
        self.next_offset = start
        self.acked = start
        self.window = window

    def room(self) -> int:
        """Bytes that may be sent before the receiver must acknowledge more."""
        return self.acked + self.window - self.next_offset

    def take(self, size: int) -> int:
        """Reserve ``size`` bytes (at most ``room()``) and return their offset."""
        if size > self.room():
            raise UsageError(f"chunk of {size} bytes does not fit the window ({self.room()})")
        offset = self.next_offset
        self.next_offset += size
        return offset

    def ack(self, offset: int) -> bool:
        """Record the receiver's consumed offset; True if it moved forward."""
        if offset > self.next_offset:
            raise FrameError(
                f"peer acknowledged offset {offset} beyond the {self.next_offset} bytes sent"
            )
        if offset <= self.acked:
            return False
        self.acked = offset
        return True


class Reassembler:
    """Receiver side: buffers out-of-order chunks, releases in-order bytes."""

    __slots__ = ("_chunks", "buffered", "consumed", "end", "limit", "next_offset", "start")

    def __init__(self, limit: int) -> None:
        self._chunks: dict[int, bytes] = {}
        self.start: int | None = None
        self.next_offset = 0
        self.consumed = 0
        self.end: int | None = None
        self.buffered = 0
        self.limit = limit

    def set_start(self, offset: int) -> None:
        """The transfer's first offset (chunks may have arrived before this is known)."""
        if self.start is not None:
            raise FrameError("bulk transfer started twice")
        if any(k < offset for k in self._chunks):
            raise FrameError(f"bulk chunk before the announced start offset {offset}")
        self.start = self.next_offset = self.consumed = offset

    def set_end(self, end: int) -> None:
        if self.end is not None:
            raise FrameError("bulk transfer ended twice")
        if end < self.next_offset or any(k >= end for k in self._chunks):
            raise FrameError(f"bulk end offset {end} is below data already received")
        self.end = end

    def add(self, offset: int, data: bytes) -> None:
        """Store one chunk; raise ``FrameError`` on overlap or window overrun."""
        size = len(data)
        if not size:
            return
        if self.start is not None and offset < self.next_offset:
            raise FrameError(f"bulk chunk at {offset} overlaps data already received")
        if self.end is not None and offset + size > self.end:
            raise FrameError(f"bulk chunk at {offset} runs past the end {self.end}")
        if offset in self._chunks:
            raise FrameError(f"bulk chunk at {offset} received twice")
        if self.buffered + size > self.limit:
            raise FrameError(
                f"peer overran the bulk window ({self.buffered + size} > {self.limit} bytes)"
            )
        self._chunks[offset] = data
        self.buffered += size

    def pop(self) -> list[bytes]:
        """Return the chunks now contiguous with what was already released."""
        if self.start is None:
            return []
        out: list[bytes] = []
        chunks = self._chunks
        nxt = self.next_offset
        while True:
            data = chunks.pop(nxt, None)
            if data is None:
                break
            out.append(data)
            nxt += len(data)
        self.next_offset = nxt
        return out

    def release(self, nbytes: int) -> None:
        """The application consumed ``nbytes`` of what ``pop`` returned."""
        self.consumed += nbytes
        self.buffered -= nbytes

    @property
    def complete(self) -> bool:
        """All bytes up to the end were released to the application."""
        return self.end is not None and self.next_offset == self.end
