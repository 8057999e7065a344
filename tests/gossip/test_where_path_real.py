"""``dwcp where PATH`` against three real daemons gossiping on loopback: one holds the
whole image, one an image sharing its first half, one (the asker) nothing; a member whose
daemon is gone is reported unreachable, not waited on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from node.cluster import NodeProc, free_udp_port, wait_until

from gossip.test_real import write_admission

MIB = 1 << 20


def where(n: NodeProc, what: str) -> Any:
    return json.loads(n.cli("where", what, "--json", timeout=120).stdout.splitlines()[-1])


def test_where_path_shares(tmp_path: Path) -> None:
    nodes = [NodeProc(tmp_path, f"w{i}") for i in range(3)]
    full, half, asker = nodes
    write_admission(nodes, {n.name: free_udp_port() for n in nodes})
    for src in (full, half):  # the asker reaches the holders over peer sessions
        asker.trust(src)
        src.trust(asker)
    data = os.urandom(2 * MIB)
    (full.images / "full.img").write_bytes(data)
    (half.images / "half.img").write_bytes(data[:MIB] + os.urandom(MIB))
    query = tmp_path / "query.img"
    query.write_bytes(data)
    try:
        for n in nodes:
            n.start()

        rows: dict[str, Any] = {}

        def answered() -> bool:  # until both holders' images reach the asker's inventory
            rows.clear()
            rows.update({r["member"]: r for r in where(asker, str(query))})
            return all(rows[n.name]["images"] for n in (full, half))

        wait_until(answered, "both holders' images in the asker's answer", polls=60, interval=0.3)
        assert set(rows) == {n.name for n in nodes}
        assert {r["state"] for r in rows.values()} == {"ok"}
        assert rows[full.name]["share"] == 1.0 and rows[full.name]["bytes"] == 2 * MIB
        assert rows[full.name]["images"] == ["full.img"]
        assert rows[half.name]["share"] == 0.5 and rows[half.name]["images"] == ["half.img"]
        assert rows[asker.name]["share"] == 0.0 and rows[asker.name]["images"] == []
        text = asker.cli("where", str(query)).stdout
        assert "full.img" in text and "half.img" in text
        half.kill()
        rows = {r["member"]: r for r in where(asker, str(query))}
        assert rows[half.name]["state"] == "unreachable"
        assert rows[full.name]["share"] == 1.0
    finally:
        for n in nodes:
            if n.proc is not None:
                n.stop()
