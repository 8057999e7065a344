"""Sans-IO bulk transfers of one session: send windows, lanes, reassembly and acks.

A transfer is announced on the control stream (``BulkStart``), its chunks go
out as ``BulkData`` frames on unidirectional "lane" streams spread over the
session's connections (``stripe.pick_lane`` chooses each chunk's lane), and it
ends with ``BulkEnd``. The receiver reassembles in order (``stripe``) and
acknowledges what its application consumed (``BulkAck``), which moves the
sender's window and is the offset a resumed transfer restarts from.

Nothing here blocks or waits: a send that finds no room returns short, and the
asyncio layer waits for the next ``BulkAcked`` or for acknowledgements at the
QUIC level (its "progress") before it calls again.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable

from dwcp import wire
from dwcp.errors import FrameError
from dwcp.transport.events import BulkAcked, BulkReadable, BulkStarted, SessionEvent, StreamKey
from dwcp.transport.layer import StreamLayer
from dwcp.transport.stripe import ConnLoad, Reassembler, SendWindow, pick_lane


class Outgoing:
    """One outgoing transfer: what was handed to lanes (``sent``) and consumed (``acked``)."""

    __slots__ = ("end", "transfer_id", "window", "writing")

    def __init__(self, transfer_id: int, offset: int, window: int) -> None:
        self.transfer_id = transfer_id
        self.window = SendWindow(offset, window)
        self.end: int | None = None
        self.writing = False  # the application has more to hand over (not app-limited)

    @property
    def sent(self) -> int:
        return self.window.next_offset

    @property
    def acked(self) -> int:
        return self.window.acked

    @property
    def complete(self) -> bool:
        """The receiver consumed everything up to the announced end."""
        return self.end is not None and self.window.acked >= self.end


class Incoming:
    """One incoming transfer: chunks reassembled in order, read by the application."""

    __slots__ = ("_ack_every", "_acked", "ready", "reasm", "transfer_id")

    def __init__(self, transfer_id: int, window: int) -> None:
        self.transfer_id = transfer_id
        self.reasm = Reassembler(window)
        self.ready: collections.deque[bytes] = collections.deque()
        self._acked = 0
        # Fine-grained enough for progress and resume offsets, coarse enough to be cheap.
        self._ack_every = max(1, min(window // 8, 1 << 20))

    @property
    def start(self) -> int | None:
        return self.reasm.start

    @property
    def offset(self) -> int:
        """Absolute offset the application has consumed (where a resumed transfer starts)."""
        return self.reasm.consumed

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read by the application (bounded by the window)."""
        return self.reasm.buffered

    @property
    def complete(self) -> bool:
        """Every byte up to the end was received and read."""
        return self.reasm.complete and not self.ready


class Transfers:
    """The bulk transfers of one session, over the connections in ``conns`` (shared list).

    ``send_control`` queues a frame on the primary connection's control stream;
    ``touched`` records that a connection has new data to transmit.
    """

    def __init__(
        self,
        conns: list[StreamLayer],
        *,
        is_client: bool,
        recv_window: int,
        send_window: int,
        chunk: int,
        max_incoming: int,
        send_control: Callable[[wire.Frame], None],
        touched: Callable[[int], None],
    ) -> None:
        self._conns = conns
        self.recv_window = recv_window
        self.send_window = send_window
        self.chunk = chunk
        self.max_incoming = max_incoming
        self._send_control = send_control
        self._touched = touched
        self._ids = itertools.count(1 if is_client else 2, 2)
        self.outgoing: dict[int, Outgoing] = {}
        self.incoming: dict[int, Incoming] = {}  # live: counted against ``max_incoming``
        self._started: dict[int, Incoming] = {}  # announced, not yet claimed
        self.shape = (1, 1)  # (connections, lanes per connection) to stripe over
        self._lane_ids: dict[tuple[int, int], int] = {}  # (conn, lane) -> stream id
        self._lanes: list[tuple[int, list[int]]] = []  # cache: conn -> its lanes' stream ids

    # --- lanes --------------------------------------------------------------

    def set_shape(self, connections: int, streams: int) -> None:
        """Stripe over the first ``connections`` connections, ``streams`` lanes on each."""
        self.shape = (connections, streams)
        self._lanes = []

    def _active_lanes(self) -> list[tuple[int, list[int]]]:
        connections, streams = self.shape
        lanes: list[tuple[int, list[int]]] = []
        for ci, quic in enumerate(self._conns[:connections]):
            sids = []
            for i in range(streams):
                sid = self._lane_ids.get((ci, i))
                if sid is None:
                    sid = quic.get_next_available_stream_id(is_unidirectional=True)
                    quic.reserve_stream(sid)
                    self._lane_ids[(ci, i)] = sid
                sids.append(sid)
            lanes.append((ci, sids))
        return lanes

    def pick(self) -> tuple[int, int] | None:
        """(connection index, stream id) of the lane for the next chunk; None if all are full."""
        if not self._lanes:
            self._lanes = self._active_lanes()
        conns = self._conns
        loads = [
            ConnLoad(conns[ci].congestion_window, [conns[ci].send_unsent(s) for s in sids])
            for ci, sids in self._lanes
        ]
        choice = pick_lane(loads, 2 * self.chunk)
        if choice is None:
            return None
        ci, sids = self._lanes[choice[0]]
        return ci, sids[choice[1]]

    @property
    def lanes(self) -> list[StreamKey]:
        """Every lane opened so far (connection index, stream id)."""
        return [StreamKey(ci, sid) for (ci, _i), sid in self._lane_ids.items()]

    def lane_acked(self) -> int:
        """Bulk bytes (with frame headers) the peer's QUIC stacks have acknowledged."""
        conns = self._conns
        return sum(conns[ci].send_acked(sid) for (ci, _i), sid in self._lane_ids.items())

    def lane_unacked(self) -> int:
        """Bulk bytes (with frame headers) written to lanes and not yet acknowledged."""
        conns = self._conns
        return sum(conns[ci].send_buffered(sid) for (ci, _i), sid in self._lane_ids.items())

    # --- sending ------------------------------------------------------------

    def open(self, offset: int) -> Outgoing:
        """Announce a transfer whose first byte is at ``offset``."""
        out = Outgoing(next(self._ids), offset, self.send_window)
        self.outgoing[out.transfer_id] = out
        self._send_control(wire.BulkStart(out.transfer_id, offset))
        return out

    def send(self, out: Outgoing, data: memoryview) -> int:
        """Hand as much of ``data`` to lanes as the window and the lanes allow; return how much.

        Short (possibly 0) when the receiver's window or every lane is full:
        call again after a ``BulkAcked`` event or after QUIC progress.
        """
        pos = 0
        total = len(data)
        window = out.window
        while pos < total:
            room = window.room()
            if room <= 0:
                break
            lane = self.pick()
            if lane is None:
                break
            ci, sid = lane
            size = min(self.chunk, total - pos, room)
            offset = window.take(size)
            quic = self._conns[ci]
            quic.send_stream_data(sid, wire.bulk_data_header(out.transfer_id, offset, size))
            quic.send_stream_data(sid, data[pos : pos + size])  # type: ignore[arg-type]
            self._touched(ci)
            pos += size
        return pos

    def finish(self, out: Outgoing) -> int:
        """Announce the end (everything sent so far); return it."""
        if out.end is None:
            out.end = out.window.next_offset
            self._send_control(wire.BulkEnd(out.transfer_id, out.end))
        if out.complete:
            self.outgoing.pop(out.transfer_id, None)
        return out.end

    def abandon(self, out: Outgoing) -> None:
        """Forget an outgoing transfer the application gave up (acks for it are ignored)."""
        self.outgoing.pop(out.transfer_id, None)

    @property
    def writing(self) -> bool:
        """Some application writer has more data to hand over (the sender is not app-limited)."""
        return any(out.writing for out in self.outgoing.values())

    def on_ack(self, frame: wire.BulkAck) -> list[SessionEvent]:
        out = self.outgoing.get(frame.transfer_id)
        if out is None:
            return []
        if not out.window.ack(frame.offset):
            return []
        if out.complete:
            del self.outgoing[frame.transfer_id]
        return [BulkAcked(frame.transfer_id, frame.offset, out.complete)]

    # --- receiving ----------------------------------------------------------

    def _incoming(self, transfer_id: int) -> Incoming:
        inc = self.incoming.get(transfer_id)
        if inc is None:
            if len(self.incoming) >= self.max_incoming:
                raise FrameError(
                    f"the peer opened more than {self.max_incoming} concurrent bulk transfers"
                )
            inc = self.incoming[transfer_id] = Incoming(transfer_id, self.recv_window)
        return inc

    def on_start(self, frame: wire.BulkStart) -> list[SessionEvent]:
        inc = self._incoming(frame.transfer_id)
        inc.reasm.set_start(frame.offset)
        self._started[frame.transfer_id] = inc
        return [BulkStarted(frame.transfer_id), *self._deliver(inc)]

    def claim(self, transfer_id: int) -> Incoming:
        """The state of a transfer a ``BulkStarted`` event announced (call once per event).

        Still valid after the transfer completed and left ``incoming``.
        """
        return self._started.pop(transfer_id)

    def on_data(self, frame: wire.BulkData) -> list[SessionEvent]:
        inc = self._incoming(frame.transfer_id)
        inc.reasm.add(frame.offset, frame.data)
        return self._deliver(inc)

    def on_end(self, frame: wire.BulkEnd) -> list[SessionEvent]:
        inc = self._incoming(frame.transfer_id)
        inc.reasm.set_end(frame.end)
        return self._deliver(inc)

    def _deliver(self, inc: Incoming) -> list[SessionEvent]:
        ready = inc.reasm.pop()
        if ready:
            inc.ready.extend(ready)
        # The end may arrive after the application already read the last chunk.
        self._maybe_ack(inc)
        if ready or inc.reasm.complete:
            return [BulkReadable(inc.transfer_id)]
        return []

    def read(self, inc: Incoming) -> bytes | None:
        """The next in-order chunk; b"" once complete; None while nothing is ready."""
        if not inc.ready:
            return b"" if inc.reasm.complete else None
        data = inc.ready.popleft()
        inc.reasm.release(len(data))
        self._maybe_ack(inc)
        return data

    def _maybe_ack(self, inc: Incoming) -> None:
        """Acknowledge what the application consumed: periodically, and once at the end.

        The final ack goes out as soon as both the end is known and every byte was
        read, whichever happens last, so the sender's ``finish`` never waits for a
        ``read`` that may not come.
        """
        reasm = inc.reasm
        consumed = reasm.consumed
        at_end = consumed == reasm.end
        if consumed != inc._acked and (at_end or consumed - inc._acked >= inc._ack_every):
            inc._acked = consumed
            self._send_control(wire.BulkAck(inc.transfer_id, consumed))
        if at_end and self.incoming.get(inc.transfer_id) is inc:
            # Nothing more can arrive for it: free the slot even if read() is never called.
            del self.incoming[inc.transfer_id]
