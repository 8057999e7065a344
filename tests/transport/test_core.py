"""The sans-IO session core in virtual time: lane choice, back-pressure, reassembly, peer limits.

No sockets, no asyncio, no sleeps: ``memnet.MemoryPair`` joins two cores over
real in-memory QUIC connections and a virtual clock; the peer-limit tests feed
frames straight into one core over a recording stand-in for QUIC.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from dwcp import wire
from dwcp.transport.config import TransportConfig
from dwcp.transport.core import CONTROL_STREAM, PeerLimits, SessionCore
from dwcp.transport.events import (
    BulkAcked,
    BulkReadable,
    BulkStarted,
    ChannelData,
    ChannelOpened,
    ProtocolError,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
    SessionEvent,
    StreamKey,
)
from dwcp.transport.stripe import ConnLoad, pick_lane
from dwcp.transport.transfers import Incoming

from .memnet import Link, MemoryPair

MiB = 1 << 20
KiB = 1 << 10


# --- lane choice (a pure function) -------------------------------------------


def test_lane_choice_prefers_the_connection_with_the_least_waiting_per_window() -> None:
    fast = ConnLoad(window=400 * KiB, unsent=[100 * KiB, 50 * KiB])  # 150/400 waiting
    slow = ConnLoad(window=100 * KiB, unsent=[30 * KiB, 30 * KiB])  # 60/100 waiting
    assert pick_lane([slow, fast], floor=64 * KiB) == (1, 1)  # fast, its emptier lane
    idle = ConnLoad(window=100 * KiB, unsent=[0, 0])
    assert pick_lane([fast, idle], floor=64 * KiB) == (1, 0)


def test_lane_choice_waits_when_every_connection_has_a_window_queued() -> None:
    full = ConnLoad(window=100 * KiB, unsent=[60 * KiB, 40 * KiB])
    assert pick_lane([full, full], floor=64 * KiB) is None
    assert pick_lane([], floor=64 * KiB) is None
    assert pick_lane([ConnLoad(window=100 * KiB, unsent=[])], floor=64 * KiB) is None


def test_lane_choice_allows_at_least_the_floor_on_a_tiny_window() -> None:
    tiny = ConnLoad(window=10 * KiB, unsent=[20 * KiB])  # above its window, below the floor
    assert pick_lane([tiny], floor=64 * KiB) == (0, 0)
    assert pick_lane([tiny], floor=16 * KiB) is None


# --- requests ---------------------------------------------------------------------


def test_requests_and_answers_and_a_late_answer_to_an_abandoned_request() -> None:
    p = MemoryPair()
    client, server = p.client.core, p.server.core
    ok = client.send_request(b"ping")
    bad = client.send_request(b"fail")
    gone = client.send_request(b"slow")
    p.run()
    got = {e.body: e.stream for e in p.server.take() if isinstance(e, RequestReceived)}
    assert set(got) == {b"ping", b"fail", b"slow"}
    server.send_response(got[b"ping"], True, b"pong")
    server.send_response(got[b"fail"], False, b"busy\ntry later")
    client.abandon_request(gone)  # the caller timed out
    server.send_response(got[b"slow"], True, b"too late")
    p.run()
    assert p.client.take() == [
        ResponseReceived(ok, b"pong"),
        RequestFailed(bad, "busy", "try later"),
    ]
    assert client.failed is None  # the late answer was dropped, not a protocol error
    again = client.send_request(b"still there?")
    p.run()
    (req,) = p.server.take()
    assert isinstance(req, RequestReceived)
    server.send_response(req.stream, True, b"yes")
    p.run()
    assert p.client.take() == [ResponseReceived(again, b"yes")]


# --- channels: order and back-pressure ------------------------------------------


def _channel_bytes(events: list[SessionEvent], key: StreamKey) -> tuple[bytes, bool]:
    data = [e.data for e in events if isinstance(e, ChannelData) and e.stream == key]
    end = any(isinstance(e, ChannelData) and e.stream == key and e.end_stream for e in events)
    return b"".join(data), end


def test_a_channel_reader_that_does_not_consume_holds_at_most_the_stream_window() -> None:
    p = MemoryPair(TransportConfig(bandwidth_bps=10e6))  # a 1 MiB stream window
    window = p.client.core.config.stream_window
    payload = random.Random(3).randbytes(4 * window + 12345)
    key = p.client.core.open_channel("bulk-ish")
    p.client.core.channel_write(key, payload, end_stream=True)
    p.run()
    events = p.server.take()
    (opened,) = [e for e in events if isinstance(e, ChannelOpened)]
    assert opened.name == "bulk-ish"
    got, end = _channel_bytes(events, opened.stream)
    header = len(wire.encode(wire.ChannelOpen("bulk-ish")))  # counts against the credit too
    assert len(got) == window - header and not end  # the peer has no more credit
    received = bytearray(got)
    while not end:
        p.server.core.channel_consumed(opened.stream, len(got))
        p.run()
        events = p.server.take()
        got, end = _channel_bytes(events, opened.stream)
        assert len(got) <= window
        received += got
    assert bytes(received) == payload


# --- bulk: window back-pressure, reassembly over lanes and connections ------------


def _drain(p: MemoryPair, inc: Incoming) -> bytes:
    """Everything the receiving application can read now."""
    out = bytearray()
    while chunk := p.server.core.transfers.read(inc):
        out += chunk
    return bytes(out)


def test_a_bulk_sender_stops_at_the_receivers_window_until_the_application_reads() -> None:
    config = TransportConfig(window=2 * MiB, chunk=256 * KiB)
    p = MemoryPair(config)
    data = random.Random(5).randbytes(9 * MiB + 777)
    transfers = p.client.core.transfers
    out = transfers.open(0)
    sent = transfers.send(out, memoryview(data))
    p.run()
    (started,) = [e for e in p.server.take() if isinstance(e, BulkStarted)]
    inc = p.server.core.transfers.claim(started.transfer_id)
    for _ in range(100):  # keep offering data: the window, not the lanes, must stop it
        sent += transfers.send(out, memoryview(data)[sent:])
        p.run()
    assert out.sent == sent == 2 * MiB
    assert inc.buffered == 2 * MiB  # all of it waits at the receiver, nothing more
    assert transfers.lane_unacked() == 0  # and nothing is stuck in the sender's QUIC buffers
    received = bytearray()
    while out.acked < len(data):
        received += _drain(p, inc)
        p.run()
        acks = [e for e in p.client.take() if isinstance(e, BulkAcked)]
        assert acks and acks[-1].offset == out.acked
        sent += transfers.send(out, memoryview(data)[sent:])
        if sent == len(data):
            transfers.finish(out)
        p.run()
        assert inc.buffered <= 2 * MiB
    received += _drain(p, inc)
    assert bytes(received) == data
    assert out.complete and inc.complete and not transfers.outgoing


def test_chunks_striped_over_lanes_and_lossy_connections_are_reassembled_in_order() -> None:
    config = TransportConfig(
        window=4 * MiB, chunk=64 * KiB, policy="fixed", initial_connections=2, initial_streams=3
    )
    lossy = iter([0.0, 0.0, 0.03, 0.03])  # client->server, server->client per connection
    p = MemoryPair(
        config, connections=2, link=lambda: Link(rate_bps=50e6, delay=0.02, loss=next(lossy))
    )
    data = random.Random(9).randbytes(3 * MiB)
    client = p.client.core.transfers
    out = client.open(0)
    inc = None
    received = bytearray()
    most_waiting = 0
    sent = 0
    for _ in range(300_000):  # bounded; about 20,000 steps are needed
        if sent < len(data):
            sent += client.send(out, memoryview(data)[sent:])
            if sent == len(data):
                client.finish(out)
        p.step()
        for e in p.server.take():
            if isinstance(e, BulkStarted):
                inc = p.server.core.transfers.claim(e.transfer_id)
            assert isinstance(e, BulkStarted | BulkReadable), e
        if inc is not None:
            most_waiting = max(most_waiting, inc.buffered - len(b"".join(inc.ready)))
            received += _drain(p, inc)
        if out.complete:
            break
    assert bytes(received) == data
    lanes = client.lanes
    assert {lane.conn for lane in lanes} == {0, 1} and len(lanes) == 6
    quics = p.client.core.conns
    assert all(quics[lane.conn].send_acked(lane.stream) > 0 for lane in lanes)
    assert most_waiting > 0  # chunks did arrive ahead of a gap and waited for it


# --- adaptation -------------------------------------------------------------------


def test_adapt_records_the_timeline_of_a_busy_transfer_in_virtual_time() -> None:
    config = TransportConfig(window=8 * MiB, policy="fixed", interval=0.5)
    p = MemoryPair(config, link=lambda: Link(rate_bps=20e6, delay=0.025))
    data = bytes(6 * MiB)
    core = p.client.core
    out = core.transfers.open(0)
    sent = 0
    assert core.adapt(p.now) == 1  # the first call starts the measurement
    next_adapt = p.now + config.interval
    inc = None
    while not out.complete:
        sent += core.transfers.send(out, memoryview(data)[sent:])
        if sent == len(data) and out.end is None:
            core.transfers.finish(out)
        p.step()
        for e in p.server.take():
            if isinstance(e, BulkStarted):
                inc = p.server.core.transfers.claim(e.transfer_id)
        if inc is not None:
            _drain(p, inc)
        if p.now >= next_adapt:
            core.adapt(p.now)
            next_adapt += config.interval
    points = core.stats().timeline
    assert len(points) >= 3
    assert max(pt.goodput_bps for pt in points) > 5e6
    assert all(pt.connections == 1 and pt.streams == 2 for pt in points)


# --- peer limits, fed frame by frame -----------------------------------------------


@dataclass
class Counters:
    packets_sent: int = 0
    packets_lost: int = 0


@dataclass
class RecordingQuic:
    """Stands in for a QUIC connection: records writes, hands out stream ids."""

    counters: Counters = field(default_factory=Counters)
    smoothed_rtt: float = 0.0
    congestion_window: int = 1 << 20
    writes: list[tuple[int, bytes, bool]] = field(default_factory=list)
    next_id: int = 0

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int:
        return self.next_id * 4 + (3 if is_unidirectional else 1)

    def reserve_stream(self, stream_id: int) -> None:
        self.next_id += 1

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.writes.append((stream_id, bytes(data), end_stream))

    def pace_stream(self, stream_id: int, window: int) -> object:
        return None

    def consume(self, stream_id: int, nbytes: int) -> bool:
        return False

    def send_buffered(self, stream_id: int) -> int:
        return 0

    def send_unsent(self, stream_id: int) -> int:
        return 0

    def send_acked(self, stream_id: int) -> int:
        return 0

    def unflushed(self) -> bool:
        return False


def _server(limits: PeerLimits) -> SessionCore:
    core = SessionCore(TransportConfig(), is_client=False, limits=limits)
    core.add_connection(RecordingQuic())
    core.adopt_control(0, wire.FrameDecoder())
    return core


def _control(core: SessionCore, frame: wire.Frame) -> list[SessionEvent]:
    return list(core.receive(0, CONTROL_STREAM, wire.encode(frame), False))


def test_requests_beyond_the_limit_end_the_session_and_later_input_is_ignored() -> None:
    core = _server(PeerLimits(requests=3))
    keys = []
    for i in range(3):
        (event,) = core.receive(0, 4 + 4 * i, wire.encode(wire.Request(b"%d" % i)), True)
        assert isinstance(event, RequestReceived)
        keys.append(event.stream)
    core.send_response(keys[0], True, b"done")  # one answered: room for one more
    (event,) = core.receive(0, 16, wire.encode(wire.Request(b"3")), True)
    assert isinstance(event, RequestReceived)
    (event,) = core.receive(0, 20, wire.encode(wire.Request(b"4")), True)
    assert isinstance(event, ProtocolError) and "more than 3 requests" in str(event.error)
    assert core.receive(0, 24, wire.encode(wire.Request(b"5")), True) == []


def test_unaccepted_channels_and_concurrent_transfers_are_capped() -> None:
    core = _server(PeerLimits(unaccepted_channels=2, transfers=2))
    for i in range(2):
        (event,) = core.receive(0, 4 + 4 * i, wire.encode(wire.ChannelOpen("c")), False)
        assert isinstance(event, ChannelOpened)
    core.channel_accepted()
    assert isinstance(
        core.receive(0, 12, wire.encode(wire.ChannelOpen("c")), False)[0], ChannelOpened
    )
    (event,) = core.receive(0, 16, wire.encode(wire.ChannelOpen("c")), False)
    assert isinstance(event, ProtocolError) and "unaccepted channels" in str(event.error)

    core = _server(PeerLimits(transfers=2))
    for tid in (1, 3):
        assert isinstance(_control(core, wire.BulkStart(tid, 0))[0], BulkStarted)
    (event,) = _control(core, wire.BulkStart(5, 0))
    assert isinstance(event, ProtocolError) and "concurrent bulk transfers" in str(event.error)


@pytest.mark.parametrize(
    ("stream", "frames", "match"),
    [
        (CONTROL_STREAM, [wire.Hello(b"s" * 16, 0, 1, 1)], "Hello sent twice"),
        (CONTROL_STREAM, [wire.Request(b"x")], "unexpected Request frame on the control"),
        (CONTROL_STREAM, [wire.BulkData(1, 0, b"x")], "BulkData on a control stream"),
        (4, [wire.Response(True, b"x")], "unexpected Response frame on stream 4"),
        (4, [wire.Request(b"a"), wire.Request(b"b")], "unexpected Request frame on stream 4"),
        (6, [wire.BulkData(1, 0, b"x" * 100), wire.ChannelOpen("late")], "unexpected Channel"),
        (6, [wire.BulkData(1, 0, b"x" * 5000)], "overran the bulk window"),
        (CONTROL_STREAM, [wire.BulkAck(1, 10)], None),  # an ack for nothing is ignored
    ],
)
def test_frames_out_of_place_are_protocol_errors(
    stream: int, frames: list[wire.Frame], match: str | None
) -> None:
    core = SessionCore(TransportConfig(window=8 * KiB, chunk=4 * KiB), is_client=False)
    core.add_connection(RecordingQuic())
    core.adopt_control(0, wire.FrameDecoder())
    core.transfers.recv_window = 4096
    events: list[SessionEvent] = []
    for frame in frames:
        events += core.receive(0, stream, wire.encode(frame), False)
    errors = [e for e in events if isinstance(e, ProtocolError)]
    if match is None:
        assert errors == [] and core.failed is None
    else:
        assert len(errors) == 1 and match in str(errors[0].error)
        assert core.failed is errors[0].error
