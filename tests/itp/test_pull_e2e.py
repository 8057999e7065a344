"""``dwcp pull`` end to end: real dwcp-node daemons on loopback, three sources, one puller."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node.cluster import NodeProc, make_image, sha256_file, wait_until

from dwcp.node.pulls import PULL_PIECE

MiB = 1 << 20


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[list[NodeProc], NodeProc, Path]]:
    srcs = [NodeProc(tmp_path, n) for n in ("a", "b", "c")]
    dst = NodeProc(tmp_path, "d")
    for s in srcs:
        s.trust(dst)
        dst.trust(s)
    started: list[NodeProc] = []
    try:
        for n in (*srcs, dst):
            n.start()
            started.append(n)
        yield srcs, dst, tmp_path
    finally:
        for n in started:
            if n.proc is not None:
                n.stop()


def _seed(srcs: list[NodeProc], root: Path, mib: int) -> Path:
    img = root / "disk.img"
    make_image(img, mib, seed=7)
    for s in srcs:
        shutil.copyfile(img, s.images / "disk.img")
    return img


def _pull(dst: NodeProc, *args: str) -> dict[str, Any]:
    r = dst.cli("pull", *args, "--json", timeout=600)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def test_pull_from_three_daemons_is_byte_identical(
    fleet: tuple[list[NodeProc], NodeProc, Path],
) -> None:
    srcs, dst, root = fleet
    img = _seed(srcs, root, 24)
    plan = _pull(dst, "disk.img", "--from", "a,b,c", "--dry-run")  # issue 16: nothing fetched
    assert plan["dry_run"] and plan["bytes_to_send"] == plan["bytes"] == img.stat().st_size
    assert set(plan["sources"]) == {"a", "b", "c"} and plan["predicted_seconds"] > 0
    # The plan is of the pull's own pieces: else the sources hash the image twice and an
    # interrupted pull's journal (of the pull's manifest) never counts as resumable.
    assert plan["piece"] == PULL_PIECE
    assert not (dst.images / "disk.img").exists()
    assert not dst.partial.exists() or not any(dst.partial.iterdir())
    out = _pull(dst, "disk.img", "--from", "a", "--from", "b,c")
    assert out["bytes_wire"] >= plan["bytes_to_send"]
    assert sha256_file(dst.images / "disk.img") == sha256_file(img) == out["sha256"]
    assert set(out["sources"]) == {"a", "b", "c"}
    assert all(v["bytes"] > 0 for v in out["sources"].values()), out["sources"]
    assert out["bytes_wire"] >= img.stat().st_size
    for key in ("seconds", "bound_seconds", "duplicate_bytes"):
        assert key in out
    assert not any(dst.partial.iterdir())


def test_a_lying_daemon_is_excluded(fleet: tuple[list[NodeProc], NodeProc, Path]) -> None:
    srcs, dst, root = fleet
    img = _seed(srcs, root, 8)
    _pull(dst, "disk.img")  # every source has cached its manifest of the good file
    (dst.images / "disk.img").unlink()
    # c now serves other bytes under the manifest it cached: same size, same mtime. All
    # of them: with one bad MiB, c was sometimes never asked for a bad piece (CI flake).
    bad = srcs[2].images / "disk.img"
    st = bad.stat()
    with open(bad, "r+b") as f:
        f.write(os.urandom(st.st_size))
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = _pull(dst, "disk.img", "--from", "a,b,c")
    assert sha256_file(dst.images / "disk.img") == sha256_file(img)
    assert out["sources"]["c"]["state"] == "excluded", out["sources"]
    assert "c" in out["excluded"]


def test_a_killed_source_has_its_work_moved(fleet: tuple[list[NodeProc], NodeProc, Path]) -> None:
    srcs, dst, root = fleet
    img = _seed(srcs, root, 96)
    proc = dst.popen_cli("pull", "disk.img", "--json")

    def started() -> bool:
        # The first piece on disk, not in the journal: over loopback with path MTU discovery
        # a 96 MiB pull ends within one of the journal's 0.5 s flushes.
        return any(p.stat().st_blocks > 0 for p in dst.partial.glob("*/data"))

    wait_until(started, "the pull's first pieces", polls=24000, interval=0.005)
    t_kill = time.monotonic()
    srcs[0].kill()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    assert sha256_file(dst.images / "disk.img") == sha256_file(img)
    # Its work moved to b and c: either it was declared dead, or (on a fast path) the others
    # stole and finished what it held before its stall window ran out.
    srcs_out = out["sources"]
    assert srcs_out["a"]["state"] in ("dead", "live"), srcs_out
    assert srcs_out["a"]["bytes"] < 96 * MiB // 3, srcs_out
    assert srcs_out["b"]["bytes"] + srcs_out["c"]["bytes"] + srcs_out["a"]["bytes"] >= 96 * MiB
    assert time.monotonic() - t_kill < 600
