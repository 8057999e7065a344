"""A destination's failure reaches the source at once (issue 19, item 2), and a warm
session to a peer that was killed and restarted is not trusted blindly (item 3)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cluster import NodeProc, make_image, sha256_file, wait_until

MiB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "b"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(d)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)])


def _fill(path: Path) -> None:
    """Take every free byte of the file system holding ``path``."""
    with open(path, "wb") as f:
        chunk = bytes(MiB)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass


def test_disk_full_mid_stream_reaches_the_source_and_keeps_the_partial(
    tmp_path: Path, tmpfs: Path
) -> None:
    """At 9038843 the destination sent disk_full and deleted the partial while the source
    stayed in "stream start" for minutes (it read no message while frames flowed)."""
    a = NodeProc(tmp_path, "a")
    b = NodeProc(tmp_path, "b")  # its directory is the tmpfs
    a.trust(b)
    b.trust(a)
    a.start()
    b.start()
    try:
        img = tmp_path / "big.img"
        make_image(img, 32, seed=7)  # ~27 MiB of data at 4 MiB/s: the disk fills mid-stream
        proc = a.popen_cli("migrate", str(img), "--to", "b", "--bwlimit", "4M")
        wait_until(lambda: b.status()["stats"]["bytes_received"] > 6 * MiB, "data to flow")
        filler = b.dir / "data" / "filler"
        _fill(filler)
        try:
            _, err = proc.communicate(timeout=120)  # at 9038843: still waiting after minutes
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode != 0 and "disk_full" in err, err
        assert "more bytes are needed" in err and "kept" in err, err
        assert not (b.images / "big.img").exists()
        assert len(list(b.partial.iterdir())) == 1  # what was written is kept
        assert b.status()["draining"] is False  # the node keeps running
        filler.unlink()
        res = a.migrate_json(str(img), "--to", "b")
        assert res["resumed"] and res["bytes_sent"] < res["bytes_missing"]
        assert sha256_file(b.images / "big.img") == sha256_file(img) == res["sha256"]
        assert list(b.partial.iterdir()) == []
    finally:
        a.stop()
        b.stop()


def test_a_warm_session_to_a_restarted_peer_is_replaced(tmp_path: Path) -> None:
    """At 9038843 the kept session to a peer killed (-9) and restarted was reused and the
    next migration failed with "idle timeout" after [limits] idle_timeout."""
    a = NodeProc(tmp_path, "a", idle_timeout=600)  # a stale session would hang 10 minutes
    b = NodeProc(tmp_path, "b")
    a.trust(b)
    b.trust(a)
    a.start()
    b.start()
    try:
        one, two = tmp_path / "one.img", tmp_path / "two.img"
        make_image(one, 2, seed=1)
        make_image(two, 2, seed=2)
        a.migrate_json(str(one), "--to", "b")  # leaves a warm session to b
        b.kill()
        b.start()
        r = a.cli("migrate", str(two), "--to", "b", "--json", timeout=120)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert sha256_file(b.images / "two.img") == sha256_file(two) == res["sha256"]
    finally:
        a.stop()
        b.stop()
