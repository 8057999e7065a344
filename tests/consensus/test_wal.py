"""The file-backed write-ahead log: durability format, torn tails, corruption, identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from dwcp.consensus import Broadcast, Compact, Persist, Wal
from dwcp.errors import WalError

ID = {"cluster_id": b"c1", "replica_id": 2, "public_key": b"k" * 32}


def test_append_replay_and_rewrite(tmp_path: Path) -> None:
    p = tmp_path / "r.wal"
    with Wal(p, create=True, **ID) as w:
        w.append([b"a", b"bb"])
        w.append([b"ccc"])
    with Wal(p, **ID) as w:
        assert w.replay() == [b"a", b"bb", b"ccc"]
        w.rewrite([b"base", b"x"])
        w.append([b"y"])
    with Wal(p, **ID) as w:
        assert w.replay() == [b"base", b"x", b"y"]


def test_perform_keeps_order_and_returns_the_rest(tmp_path: Path) -> None:
    p = tmp_path / "r.wal"
    with Wal(p, create=True, **ID) as w:
        rest = w.perform(
            [Persist(b"1"), Broadcast(b"m"), Compact((b"base",)), Persist(b"2"), Broadcast(b"n")]
        )
        assert rest == [Broadcast(b"m"), Broadcast(b"n")]
    with Wal(p, **ID) as w:
        assert w.replay() == [b"base", b"2"]


def test_missing_log_is_refused_unless_created(tmp_path: Path) -> None:
    with pytest.raises(WalError, match="recovering"):
        Wal(tmp_path / "none.wal", **ID)


def test_wrong_identity_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "r.wal"
    Wal(p, create=True, **ID).close()
    with pytest.raises(WalError, match="another cluster or replica"):
        Wal(p, **{**ID, "replica_id": 3})
    with pytest.raises(WalError, match="another cluster or replica"):
        Wal(p, **{**ID, "cluster_id": b"c2"})
    (tmp_path / "junk").write_bytes(b"not a wal at all")
    with pytest.raises(WalError, match="not a dwcp"):
        Wal(tmp_path / "junk", **ID)


@pytest.mark.parametrize("cut", [1, 4, 8, 9, 11])
def test_torn_tail_is_dropped(tmp_path: Path, cut: int) -> None:
    p = tmp_path / "r.wal"
    with Wal(p, create=True, **ID) as w:
        w.append([b"first"])
        w.append([b"second!!"])
    data = p.read_bytes()
    p.write_bytes(data[:-cut])
    with Wal(p, **ID) as w:
        assert w.replay() == [b"first"]
        assert w.torn_tail
        w.append([b"third"])
    with Wal(p, **ID) as w:
        assert w.replay() == [b"first", b"third"]


def test_garbage_last_record_is_torn(tmp_path: Path) -> None:
    p = tmp_path / "r.wal"
    with Wal(p, create=True, **ID) as w:
        w.append([b"first", b"second"])
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with Wal(p, **ID) as w:
        assert w.replay() == [b"first"]


def test_corruption_in_the_middle_raises(tmp_path: Path) -> None:
    p = tmp_path / "r.wal"
    with Wal(p, create=True, **ID) as w:
        w.append([b"first-record", b"second", b"third"])
    data = bytearray(p.read_bytes())
    idx = data.index(b"first-record")
    data[idx] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(WalError, match="corrupt"):
        Wal(p, **ID)
