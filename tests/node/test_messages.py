from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp.errors import ProtocolError
from dwcp.migrate import messages as m

TID = "ab" * 16


@pytest.mark.parametrize(
    "msg",
    [
        m.Offer(TID, "vm.qcow2", 1 << 30, b"s" * 32, b"manifest", b"x" * 64),
        m.Plan(TID, ((0, 4096), (8192, 1 << 20)), 5, 6, 7),
        m.Plan(TID, (), 0, 0, 0),
        m.Data(TID, b"frame"),
        m.Done(TID, 3, 1000, b"h" * 32, b"x" * 64),
        m.Ack(TID, b"h" * 32, "vm.qcow2"),
        m.Error(TID, "disk_full", "no space left"),
        m.NeedLeaves(TID, (0, 5, 70000)),
        m.NeedLeaves(TID, ()),
        m.Leaves(TID, b"leaves"),
    ],
)
def test_roundtrip(msg: m.Message) -> None:
    assert m.decode(m.encode(msg)) == msg


def test_constructors_validate() -> None:
    with pytest.raises(ProtocolError):
        m.Offer("nothex", "a", 1, b"s" * 32, b"m", b"x" * 64)
    with pytest.raises(ProtocolError):
        m.Offer(TID, "a", -1, b"s" * 32, b"m", b"x" * 64)
    with pytest.raises(ProtocolError):
        m.Error(TID, "whatever", "x")
    with pytest.raises(ProtocolError):
        m.Ack(TID, b"short", "a")


def test_ranges_must_be_sorted_and_disjoint() -> None:
    bad = m.pack_ranges([(4096, 4096), (0, 4096)])
    raw = msgpack.packb([m.VERSION, m.Plan.TYPE, TID, bad, 0, 0, 0], use_bin_type=True)
    with pytest.raises(ProtocolError, match="sorted"):
        m.decode(raw)


@pytest.mark.parametrize(
    "obj",
    [
        [2, 1],
        [1, 99, TID],
        [1, m.Done.TYPE, TID, 1],
        [1, m.Done.TYPE, TID, "1", 2],
        {"a": 1},
        [1, m.Plan.TYPE, TID, "notbytes", 0, 0, 0],
        [1, True, TID],
    ],
)
def test_bad_messages(obj: object) -> None:
    with pytest.raises(ProtocolError):
        m.decode(msgpack.packb(obj, use_bin_type=True))


def test_oversized_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        m.decode(b"\x00" * (m.MAX_MESSAGE + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        m.decode(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_truncated_or_flipped_messages(cut: int, junk: bytes) -> None:
    good = m.encode(m.Plan(TID, ((0, 4096), (8192, 4096)), 1, 2, 3))
    for data in (good[:cut], good[:cut] + junk + good[cut + len(junk) :]):
        with contextlib.suppress(ProtocolError):
            m.decode(data)
