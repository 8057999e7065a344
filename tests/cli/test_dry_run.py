"""``dwcp migrate --dry-run`` (issue 16): its figures (zero, already at the destination,
to send) are what the real run then sends; it stores nothing, claims nothing and
leaves no job behind."""

from __future__ import annotations

import json
from pathlib import Path

from node.cluster import NodeProc, make_image, mutate, sha256_file


def test_dry_run_figures_equal_what_the_real_run_sends(tmp_path: Path) -> None:
    a, b = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b")
    a.trust(b)
    b.trust(a)
    base, new = tmp_path / "base.raw", tmp_path / "new.raw"
    make_image(base, 8, seed=5)
    mutate(base, new, blocks=list(range(0, 2048, 9)), seed=6)
    a.start()
    b.start()
    try:
        a.migrate_json(str(base), "--to", "b")
        dry = a.migrate_json(str(new), "--to", "b", "--dry-run", "--bwlimit", "4M")
        assert dry["dry_run"] is True and dry["bytes_sent"] == 0
        assert not (b.images / "new.raw").exists()
        assert dry["bytes_local"] > 0 and dry["bytes_zero"] > 0
        assert 0 < dry["bytes_to_send"] < dry["bytes_image"]
        assert dry["bytes_zero"] + dry["bytes_local"] + dry["bytes_missing"] == dry["bytes_image"]
        assert dry["bytes_wire"] < dry["bytes_to_send"]  # the offer and the plan, no data
        assert dry["predicted_seconds"] is not None and dry["predicted_seconds"] > 0
        text = a.cli("migrate", str(new), "--to", "b", "--dry-run").stdout
        assert text.startswith("dry run: new.raw to b: ") and "nothing sent" in text
        jobs = json.loads(a.cli("jobs", "--json").stdout.splitlines()[-1])["jobs"]
        assert [j["name"] for j in jobs] == ["base.raw"]  # dry runs are not jobs
        real = a.migrate_json(str(new), "--to", "b")
        assert real["dry_run"] is False
        assert real["bytes_sent"] == dry["bytes_to_send"] == real["bytes_to_send"]
        for k in ("bytes_image", "bytes_zero", "bytes_local", "bytes_missing"):
            assert real[k] == dry[k], k
        assert sha256_file(b.images / "new.raw") == sha256_file(new)
    finally:
        a.stop()
        b.stop()
