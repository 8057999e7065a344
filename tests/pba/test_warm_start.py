"""Sessions to a known path start at the level its history knows (PBA, issue 14)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from dwcp.identity import NodeKey
from dwcp.node.config import Address, Peer
from dwcp.node.sessions import PeerSessions
from dwcp.pba.paths import PathStore, Second
from dwcp.transport import TransportConfig


def test_a_known_path_starts_at_its_last_level_and_an_unknown_one_as_configured(
    tmp_path: Path,
) -> None:
    base = TransportConfig(initial_connections=1, initial_streams=2)
    s = PeerSessions(NodeKey.generate(), Address("127.0.0.1", 1), lambda: [], base)
    known = Peer("b", Address("127.0.0.1", 2), NodeKey.generate().public)
    unknown = Peer("c", Address("127.0.0.1", 3), NodeKey.generate().public)
    assert asyncio.run(s.warm_config(known)) is base  # no store: as configured
    s.paths = PathStore(tmp_path)
    s.paths.record_session(
        known.public_key.node_id, [Second(1.0, 80e6, 0.05, 0.0)], name="b", level=(4, 2)
    )
    warm = asyncio.run(s.warm_config(known))
    assert warm is not None
    assert (warm.initial_connections, warm.initial_streams) == (4, 2)
    assert warm.idle_timeout == base.idle_timeout
    assert asyncio.run(s.warm_config(unknown)) is base


def test_a_migration_leaves_the_path_in_the_history(tmp_path: Path) -> None:
    from node.cluster import NodeProc, make_image

    a, b = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b")
    a.trust(b)
    b.trust(a)
    a.start()
    b.start()
    try:
        img = tmp_path / "vm.raw"
        make_image(img, 48, seed=1)
        a.migrate_json(str(img), "--to", "b")
        for _ in range(100):  # the history is written in a thread after the check-in
            rows = json.loads(a.cli("paths", "--json").stdout)["paths"]
            if rows:
                break
            asyncio.run(asyncio.sleep(0.05))
        (row,) = rows
        assert row["name"] == "b" and row["connections"] >= 1 and row["streams"] >= 1
        other = tmp_path / "other.raw"
        make_image(other, 16, seed=2)
        second = a.migrate_json(str(other), "--to", "b")
        assert "predicted_seconds" in second
        if row["samples"]:  # the first migration lasted a second or more: the path is known
            assert second["predicted_seconds"] > 0
    finally:
        for n in (a, b):
            if n.proc is not None:
                n.stop()


def test_a_known_path_gives_the_transport_a_careful_resume_hint(tmp_path: Path) -> None:
    import time

    s = PeerSessions(NodeKey.generate(), Address("127.0.0.1", 1), lambda: [], TransportConfig())
    s.paths = PathStore(tmp_path)
    known = Peer("b", Address("127.0.0.1", 2), NodeKey.generate().public)
    now = time.time()
    rates = [80e6, 78e6, 82e6, 79e6, 81e6, 80e6, 77e6, 83e6, 80e6, 79e6]
    seconds = [Second(now - 10 + i, r, 0.05 + 0.001 * (i % 3), 0.0) for i, r in enumerate(rates)]
    s.paths.record_session(known.public_key.node_id, seconds, level=(2, 2))
    warm = asyncio.run(s.warm_config(known))
    assert warm is not None
    assert 0.5 * 80e6 < warm.resume_bps < 80e6  # a low percentile, not the mean
    assert warm.resume_rtt == 0.05
    rec = s.paths.get(known.public_key.node_id)
    assert rec is not None
    assert rec.resume_hint(now + 3 * 86400) is None  # stale: start cold
    rec.seconds = rec.seconds[:2]
    assert rec.resume_hint(now) is None  # too little history
