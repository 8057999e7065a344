"""End to end: real dwcp-node daemons on loopback, driven exactly like an operator would."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cluster import (
    NodeProc,
    free_udp_port,
    make_image,
    mutate,
    sha256_file,
    wait_until,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProc, NodeProc, Path]]:
    root = tmp_path_factory.mktemp("e2e")
    a, b = NodeProc(root, "a"), NodeProc(root, "b")
    a.trust(b)
    b.trust(a)
    a.start()
    b.start()
    try:
        yield a, b, root
    finally:
        for n in (a, b):
            if n.proc is not None:
                n.stop()


def test_cold_warm_and_cross_image(pair: tuple[NodeProc, NodeProc, Path]) -> None:
    a, b, root = pair
    v1 = root / "vm.qcow2"
    make_image(v1, 8, seed=1)
    cold = a.migrate_json(str(v1), "--to", "b")
    assert cold["sha256"] == sha256_file(v1) == sha256_file(b.images / "vm.qcow2")
    assert cold["bytes_missing"] > 0 and cold["bytes_image"] == 8 * MiB
    for key in ("bytes_wire", "seconds", "dedup_ratio", "name", "peer", "bytes_missing"):
        assert key in cold
    # warm: the VM changed its disk; the destination has the older version
    v2 = root / "vm.qcow2.new"
    mutate(v1, v2, [10, 500, 1500], seed=2)
    v2.replace(v1)
    v2 = v1
    warm = a.migrate_json(str(v2), "--to", "b")
    assert warm["bytes_missing"] == 3 * 4096
    assert sha256_file(b.images / "vm.qcow2") == sha256_file(v2) == warm["sha256"]
    assert warm["bytes_wire"] < cold["bytes_wire"] / 10
    # another image sharing most blocks (shuffled) with the stored one, under a new name
    data = v2.read_bytes()
    blocks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    random.Random(3).shuffle(blocks)
    other = root / "other.raw"
    other.write_bytes(b"".join(blocks) + random.Random(4).randbytes(8192))
    cross = a.migrate_json(str(other), "--to", "b", "--name", "other.raw")
    assert cross["bytes_missing"] == 8192
    assert sha256_file(b.images / "other.raw") == sha256_file(other)
    listing = json.loads(b.cli("images", "--json").stdout)["images"]
    assert {(i["name"], i["sha256"]) for i in listing} == {
        ("vm.qcow2", sha256_file(v2)),
        ("other.raw", sha256_file(other)),
    }
    st = json.loads(b.cli("status", "--json").stdout)
    assert st["running"] and st["stats"]["bytes_deduplicated"] > 0
    peers = json.loads(a.cli("peers", "--json").stdout)
    assert peers["node_running"] and peers["peers"][0]["reachable"] is True


def test_an_image_put_into_images_while_running_is_a_source(
    pair: tuple[NodeProc, NodeProc, Path],
) -> None:
    a, b, root = pair
    base = root / "dropped-base.img"
    make_image(base, 4, seed=21)
    os.link(base, b.images / "dropped.img")  # the operator puts an image there by hand
    new = root / "dropped-new.img"
    mutate(base, new, [7], seed=22)
    out = a.migrate_json(str(new), "--to", "b", "--name", "dropped-2.img")
    assert out["bytes_missing"] == 4096
    assert sha256_file(b.images / "dropped-2.img") == sha256_file(new)


def test_concurrent_migrations(pair: tuple[NodeProc, NodeProc, Path]) -> None:
    a, b, root = pair
    imgs = []
    for i in range(3):
        p = root / f"conc{i}.img"
        make_image(p, 4, seed=100 + i)
        imgs.append(p)
    procs = [a.popen_cli("migrate", str(p), "--to", "b", "--json") for p in imgs]
    for p, proc in zip(imgs, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["sha256"] == sha256_file(p)
        assert sha256_file(b.images / p.name) == sha256_file(p)


def test_one_migration_per_image_name_at_a_time(pair: tuple[NodeProc, NodeProc, Path]) -> None:
    a, b, root = pair
    img = root / "once.img"
    make_image(img, 4, seed=31)
    slow = a.popen_cli("migrate", str(img), "--to", "b", "--bwlimit", "1M", "--json")
    try:
        wait_until(
            lambda: a.status()["stats"]["active_transfers"]["out"] >= 1, "the first migration"
        )
        second = a.cli("migrate", str(img), "--to", "b", check=False)
        assert second.returncode == 2 and "already being migrated" in second.stderr
    finally:
        _out, err = slow.communicate(timeout=300)
    assert slow.returncode == 0, err
    assert sha256_file(b.images / "once.img") == sha256_file(img)


def test_clear_errors(pair: tuple[NodeProc, NodeProc, Path]) -> None:
    a, _b, root = pair
    r = a.cli("migrate", str(root / "nope.img"), "--to", "b", check=False)
    assert r.returncode != 0 and "not found" in r.stderr
    img = root / "small.img"
    make_image(img, 1, seed=9)
    r = a.cli("migrate", str(img), "--to", "zed", check=False)
    assert r.returncode != 0 and "unknown peer 'zed'" in r.stderr


def test_image_changing_while_sent_is_refused(pair: tuple[NodeProc, NodeProc, Path]) -> None:
    a, b, root = pair
    img = root / "changing.img"
    make_image(img, 16, seed=11)  # ~14 MiB of data at 1 MiB/s: the write lands mid-transfer
    # The nodes are shared by the module: count only this transfer's bytes, so the write
    # cannot land before the source has scanned the image (that would be a legal migration
    # of the grown image, not the case under test).
    baseline = b.status()["stats"]["bytes_received"]
    proc = a.popen_cli("migrate", str(img), "--to", "b", "--bwlimit", "1M")
    wait_until(lambda: a.status()["stats"]["active_transfers"]["out"] == 1, "the transfer")
    wait_until(lambda: b.status()["stats"]["bytes_received"] > baseline + 65536, "data to flow")
    with open(img, "ab") as f:  # the VM writes: the file grows
        f.write(b"x" * 4096)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "changed" in err
    assert not (b.images / "changing.img").exists()
    wait_until(lambda: not list(b.partial.iterdir()), "the destination to drop the data")


def test_peers_added_while_running_and_metrics(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc, Path]
) -> None:
    a, _b, _root = pair
    port = free_udp_port(socket.SOCK_STREAM)
    d = NodeProc(tmp_path, "d", metrics_port=port)
    d.start()  # no peers yet: nothing to serve
    try:
        d.trust(a)  # the running node reloads its peers and starts serving
        a.trust(d)
        img = tmp_path / "live.img"
        make_image(img, 2, seed=41)
        res = a.migrate_json(str(img), "--to", "d")
        assert sha256_file(d.images / "live.img") == sha256_file(img) == res["sha256"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        received = [ln for ln in text.splitlines() if ln.startswith("dwcp_bytes_received_total")]
        assert received and float(received[0].split()[-1]) > 0
        assert 'dwcp_migrations_total{direction="in",result="ok"} 1.0' in text
    finally:
        d.stop()


def test_untrusted_node_is_refused(tmp_path: Path, pair: tuple[NodeProc, NodeProc, Path]) -> None:
    _a, b, _root = pair
    c = NodeProc(tmp_path, "c")
    c.trust(b)  # c trusts b, but b does not trust c
    c.start()
    try:
        img = tmp_path / "x.img"
        make_image(img, 1, seed=5)
        r = c.cli("migrate", str(img), "--to", "b", check=False)
        assert r.returncode != 0
        assert "trust" in r.stderr.lower() or "refused" in r.stderr.lower(), r.stderr
        assert not (b.images / "x.img").exists()
    finally:
        c.stop()


def _slow_transfer(a: NodeProc, b: NodeProc, img: Path) -> subprocess.Popen[str]:
    proc = a.popen_cli("migrate", str(img), "--to", "b", "--bwlimit", "4M", "--json")
    wait_until(lambda: b.status()["stats"]["bytes_received"] > 3 * MiB, "data to flow")
    return proc


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    # A short idle timeout so that a killed peer is noticed quickly (not a timing threshold).
    a = NodeProc(tmp_path, "a", idle_timeout=3)
    b = NodeProc(tmp_path, "b", drain_seconds=0, idle_timeout=3)
    a.trust(b)
    b.trust(a)
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        for n in (a, b):
            if n.proc is not None:
                n.stop()


def test_resume_after_killing_the_sender(tmp_path: Path, fresh: tuple[NodeProc, NodeProc]) -> None:
    a, b = fresh
    img = tmp_path / "big.img"
    make_image(img, 16, seed=21)
    proc = _slow_transfer(a, b, img)
    a.kill()
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    a.start()
    res = a.migrate_json(str(img), "--to", "b")
    assert res["resumed"] and res["bytes_sent"] < res["bytes_missing"]
    assert sha256_file(b.images / "big.img") == sha256_file(img) == res["sha256"]
    assert list(b.partial.iterdir()) == []


def test_resume_after_stopping_the_receiver(
    tmp_path: Path, fresh: tuple[NodeProc, NodeProc]
) -> None:
    a, b = fresh
    img = tmp_path / "big.img"
    make_image(img, 16, seed=22)
    proc = _slow_transfer(a, b, img)
    assert b.stop() == 0  # SIGTERM, drain_seconds = 0: stop now, keep the partial transfer
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "error" in err
    assert len(list(b.partial.iterdir())) == 1 and not (b.images / "big.img").exists()
    b.start()
    res = a.migrate_json(str(img), "--to", "b")
    assert res["resumed"] and res["bytes_sent"] < res["bytes_missing"]
    assert sha256_file(b.images / "big.img") == sha256_file(img)


def test_resume_after_killing_the_receiver(
    tmp_path: Path, fresh: tuple[NodeProc, NodeProc]
) -> None:
    a, b = fresh
    img = tmp_path / "big.img"
    make_image(img, 16, seed=23)
    proc = _slow_transfer(a, b, img)
    b.kill()
    proc.communicate(timeout=120)
    b.start()
    res = a.migrate_json(str(img), "--to", "b")  # what was not journaled is sent again
    assert sha256_file(b.images / "big.img") == sha256_file(img) == res["sha256"]
    assert list(b.partial.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_at_destination(tmp_path: Path) -> None:
    a = NodeProc(tmp_path, "a")
    bdir = tmp_path / "b"
    bdir.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(bdir)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        b = NodeProc(tmp_path, "b")
        a.trust(b)
        b.trust(a)
        a.start()
        b.start()
        try:
            small, big = tmp_path / "small.img", tmp_path / "big.img"
            make_image(small, 1, seed=31)
            make_image(big, 8, seed=32)
            a.migrate_json(str(small), "--to", "b")
            r = a.cli("migrate", str(big), "--to", "b", check=False)
            assert r.returncode != 0 and ("disk_full" in r.stderr or "space" in r.stderr), r.stderr
            assert not (b.images / "big.img").exists()
            assert list(b.partial.iterdir()) == []
            assert sha256_file(b.images / "small.img") == sha256_file(small)  # nothing lost
            assert b.status()["draining"] is False  # the node keeps running
        finally:
            a.stop()
            b.stop()
    finally:
        subprocess.run(["umount", "-l", str(bdir)])
