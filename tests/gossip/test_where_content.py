"""The counting behind ``dwcp where PATH`` (no daemons): bytes of the file's pieces found
in any of a member's manifests, each piece once, and which images matched."""

from __future__ import annotations

import pytest

from dwcp.errors import UsageError
from dwcp.gossip.where_content import file_pieces, held, member_row, parse_request
from dwcp.migrate.multi import PieceManifest


def test_file_pieces_last_one_short() -> None:
    m = PieceManifest("f", 10, "", 4, ("a", "b", "c"))
    assert file_pieces(m) == [("a", 4), ("b", 4), ("c", 2)]


def test_each_piece_once_any_offset_any_image() -> None:
    pieces = [("a", 4), ("b", 4), ("a", 4), ("c", 2)]
    manifests = {"x.img": ["z", "b", "a"], "y.img": ["a"], "w.img": ["q"]}
    got, images = held(pieces, manifests)
    assert got == 12  # both "a" pieces and "b": the file's pieces, not the member's
    assert images == ["x.img", "y.img"]


def test_nothing_held() -> None:
    assert held([("a", 4)], {}) == (0, [])
    assert held([("a", 4)], {"x.img": ["b"]}) == (0, [])


def test_row_share() -> None:
    r = member_row("m", 8, [("a", 4), ("b", 4)], {"x.img": ["a"]})
    assert r == {"member": "m", "bytes": 4, "share": 0.5, "images": ["x.img"], "state": "ok"}
    assert member_row("m", 0, [], {})["share"] == 0.0


def test_request_checked() -> None:
    assert parse_request({"size": 10, "piece": 4, "hashes": ["a", "b", "c"]})[2][-1] == ("c", 2)
    with pytest.raises(UsageError):
        parse_request({"size": 10, "piece": 4, "hashes": ["a"]})
    with pytest.raises(UsageError):
        parse_request({"size": 10})
