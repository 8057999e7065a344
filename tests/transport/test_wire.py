"""The sans-IO frame codec: round trips, caps, and hostile input never crashes it."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp import wire
from dwcp.errors import FrameError

FRAMES: list[wire.Frame] = [
    wire.Hello(b"s" * 16, 0, 1, 1 << 20),
    wire.Hello(b"\x00" * 16, 3, 8, 1),
    wire.Request(b""),
    wire.Request(b"ping" * 100),
    wire.Response(True, b"pong"),
    wire.Response(False, b"no_handler\nnope"),
    wire.ChannelOpen(""),
    wire.ChannelOpen("migrate/vm-1"),
    wire.BulkStart(1, 0),
    wire.BulkStart(7, 1 << 40),
    wire.BulkData(3, 123456, b"x" * 1000),
    wire.BulkData(3, 0, b""),
    wire.BulkEnd(3, 1 << 33),
    wire.BulkAck(3, 99),
    wire.Close("bye"),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_every_frame_type_round_trips(frame: wire.Frame) -> None:
    data = wire.encode(frame)
    assert wire.FrameDecoder().feed(data) == [frame]
    # Byte by byte too: the decoder must hold partial frames.
    dec = wire.FrameDecoder()
    out: list[wire.Frame] = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert out == [frame]
    assert dec.buffered == 0


def test_all_frames_in_one_stream() -> None:
    blob = b"".join(wire.encode(f) for f in FRAMES)
    assert wire.FrameDecoder().feed(blob) == FRAMES


def test_every_type_in_the_table_has_a_test() -> None:
    encoded_types = {wire.encode(f)[3] for f in FRAMES}
    assert encoded_types == set(wire.FRAME_TYPES)


@pytest.mark.parametrize(
    "header, match",
    [
        (b"XX" + bytes([wire.VERSION, wire.T_REQUEST]) + struct.pack("!I", 0), "magic"),
        (b"DW" + bytes([2, wire.T_REQUEST]) + struct.pack("!I", 0), "version"),
        (b"DW" + bytes([wire.VERSION, 200]) + struct.pack("!I", 0), "unknown frame type"),
        (
            b"DW" + bytes([wire.VERSION, wire.T_REQUEST]) + struct.pack("!I", wire.MAX_PAYLOAD + 1),
            "length",
        ),
        (b"DW" + bytes([wire.VERSION, wire.T_HELLO]) + struct.pack("!I", 3), "length"),
    ],
)
def test_malformed_headers_are_refused_before_buffering(header: bytes, match: str) -> None:
    dec = wire.FrameDecoder()
    with pytest.raises(FrameError, match=match):
        dec.feed(header)
    with pytest.raises(FrameError, match="already failed"):
        dec.feed(b"")


def test_bad_field_values() -> None:
    with pytest.raises(FrameError):
        wire.FrameDecoder().feed(
            wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.T_RESPONSE, 1) + b"\x07"
        )
    with pytest.raises(FrameError):
        wire.FrameDecoder().feed(
            wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.T_HELLO, 28)
            + b"s" * 16
            + struct.pack("!HHQ", 5, 5, 1)
        )


def test_detach_returns_raw_bytes_after_a_frame() -> None:
    dec = wire.FrameDecoder()
    frames = dec.feed(wire.encode(wire.ChannelOpen("c")) + b"raw bytes", limit=1)
    assert frames == [wire.ChannelOpen("c")]
    assert dec.detach() == b"raw bytes"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_input_only_raises_frame_error(chunks: list[bytes]) -> None:
    dec = wire.FrameDecoder()
    try:
        for chunk in chunks:
            dec.feed(chunk)
    except FrameError:
        pass
    assert dec.buffered <= wire.HEADER.size + wire.MAX_PAYLOAD


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(FRAMES),
    st.integers(min_value=0, max_value=2000),
    st.binary(max_size=16),
    st.integers(min_value=0, max_value=255),
)
def test_truncated_or_corrupted_frames(frame: wire.Frame, cut: int, tail: bytes, flip: int) -> None:
    data = bytearray(wire.encode(frame))
    cut = min(cut, len(data))
    dec = wire.FrameDecoder()
    # Truncated: never a frame, never an exception other than FrameError.
    try:
        got = dec.feed(bytes(data[:cut]))
        assert got == ([frame] if cut == len(data) else [])
    except FrameError:
        pass
    # One corrupted byte followed by junk.
    data[cut % len(data)] ^= flip
    with contextlib.suppress(FrameError):
        wire.FrameDecoder().feed(bytes(data) + tail)
