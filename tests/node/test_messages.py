from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp.errors import ProtocolError
from dwcp.migrate import messages as m

TID = "ab" * 16
SIG = b"x" * 64


def offer(**kw: object) -> m.Offer:
    args: dict[str, object] = dict(
        transfer_id=TID,
        name="a",
        size=1,
        block_size=4096,
        nonzero_blocks=1,
        runs=1,
        entries=1,
        root=b"r" * 16,
        content_id=b"c" * 32,
        summary_sha256=b"s" * 32,
        replace=m.REFUSE,
        origin=b"o" * 16,
        backing="",
        signature=SIG,
    )
    args.update(kw)
    return m.Offer(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "msg",
    [
        offer(name="vm.qcow2", size=1 << 30, backing="base.qcow2", replace=m.BACKUP),
        m.PlanHeader(TID, 5, 6, 7, 4),
        m.PlanHeader(TID, 0, 0, 0, 0),
        m.Data(TID, b"frame"),
        m.Done(TID, 3, 1000, b"h" * 32, b"x" * 64),
        m.Ack(TID, b"h" * 32, "vm.qcow2"),
        m.Error(TID, "disk_full", "no space left"),
        m.Part(TID, m.SUMMARY, False, b"entries"),
        m.Part(TID, m.NEED, True, b""),
        m.Part(TID, m.LEAVES, True, b"x" * m.MAX_PART),
        m.Part(TID, m.RANGES, False, m.pack_ranges([(0, 4096), (8192, 1 << 20)])),
    ],
)
def test_roundtrip(msg: m.Message) -> None:
    assert m.decode(m.encode(msg)) == msg


def test_constructors_validate() -> None:
    offer()
    with pytest.raises(ProtocolError):
        offer(transfer_id="nothex")
    with pytest.raises(ProtocolError):
        offer(size=-1)
    with pytest.raises(ProtocolError):
        offer(root=b"short")
    with pytest.raises(ProtocolError):
        m.Part(TID, 7, True, b"")
    with pytest.raises(ProtocolError):
        m.Part(TID, m.NEED, True, b"x" * (m.MAX_PART + 1))
    with pytest.raises(ProtocolError):
        m.Error(TID, "whatever", "x")
    with pytest.raises(ProtocolError):
        m.Ack(TID, b"short", "a")


def test_ranges_must_be_sorted_and_disjoint() -> None:
    with pytest.raises(ProtocolError, match="sorted"):
        m.unpack_ranges(m.pack_ranges([(4096, 4096), (0, 4096)]))
    with pytest.raises(ProtocolError, match="sorted"):  # across pieces too
        m.unpack_ranges(m.pack_ranges([(0, 4096)]), after=8192)
    assert m.unpack_ranges(m.pack_ranges([(8192, 1)]), after=8192) == [(8192, 1)]


@pytest.mark.parametrize(
    "obj",
    [
        [2, 1],
        [1, 99, TID],
        [1, m.Done.TYPE, TID, 1],
        [1, m.Done.TYPE, TID, "1", 2],
        {"a": 1},
        [m.VERSION, m.PlanHeader.TYPE, TID, "notanint", 0, 0, 0],
        [m.VERSION, m.Part.TYPE, TID, m.NEED, 1, b""],
        [2, m.PlanHeader.TYPE, TID, 0, 0, 0, 0],
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
    good = m.encode(m.Part(TID, m.RANGES, True, m.pack_ranges([(0, 4096), (8192, 4096)])))
    for data in (good[:cut], good[:cut] + junk + good[cut + len(junk) :]):
        with contextlib.suppress(ProtocolError):
            m.decode(data)
