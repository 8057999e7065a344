"""ASS inventories: Scuttlebutt anti-entropy converges, truncation leaves no gap, a new
life of an origin voids what its earlier life said."""

from __future__ import annotations

import random

import pytest

from dwcp.errors import ProtocolError
from dwcp.gossip.inventory import Inventory, decode_sync, encode_sync


def sync(a: Inventory, b: Inventory, budget: int = 8000) -> None:
    b.apply(a.deltas_for(b.digest(), budget))
    a.apply(b.deltas_for(a.digest(), budget))


def test_push_pull_converges_with_small_budgets() -> None:
    rng = random.Random(1)
    inv = [Inventory(f"n{i}", now_us=1000 * i) for i in range(10)]
    for i, x in enumerate(inv):
        x.set_local({f"img/vm{i}-{k}": f"{k} {'ab' * 32}" for k in range(20)})
    for _ in range(1500):
        a, b = rng.sample(inv, 2)
        sync(a, b, budget=400)  # a few deltas per exchange: truncation must leave no gap
    for x in inv:
        for i in range(10):
            assert len(x.images(f"n{i}")) == 20
    assert [w["member"] for w in inv[0].where("vm3-7")] == ["n3"]
    assert {w["member"] for w in inv[0].where("ab" * 32)} == {f"n{i}" for i in range(10)}


def test_deletion_and_restart() -> None:
    a, b = Inventory("a", now_us=100), Inventory("b", now_us=5)
    a.set_local({"img/x": "1 aa", "img/y": "2 bb"})
    sync(a, b)
    assert set(b.images("a")) == {"x", "y"}
    a.set_local({"img/x": "1 aa"})  # y deleted in the same life: a tombstone
    sync(a, b)
    assert set(b.images("a")) == {"x"}
    a2 = Inventory("a", now_us=10_000)  # restarted; knows nothing of x
    a2.set_local({"img/z": "3 cc"})
    sync(a2, b)
    assert set(b.images("a")) == {"z"}
    b.apply([("a", "img/x", 150, "1 aa")])  # a stale delta from the old life
    assert set(b.images("a")) == {"z"}


def test_non_admitted_origins_are_ignored() -> None:
    b = Inventory("b", now_us=1)
    assert b.apply([("mallory", "img/x", 5, "1 aa")], admitted={"a", "b"}) == set()
    assert b.where("x") == []


def test_codec() -> None:
    msg = encode_sync({"a": 5}, [("a", "img/x", 5, None)], 1)
    assert decode_sync(msg) == ({"a": 5}, [("a", "img/x", 5, None)], 1)
    for bad in (
        b"",
        b"DI",
        b"DI{}",
        b'DI{"d": [], "x": [], "r": 1}',
        b'DI{"d": {}, "x": [], "r": 7}',
        b'DI{"d":{},"x":[[1,2,3,4]],"r":0}',
    ):
        with pytest.raises(ProtocolError):
            decode_sync(bad)
