"""A real dwcp-node supervising a real (TCG) QEMU guest, driven through the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node.cluster import NodeProc, wait_until

from dwcp.vm import guest
from vm.guestfix import need_guest

DISK_MIB = 4


def kill_qemus(node: NodeProc) -> None:
    """Test cleanup: QEMU outlives its node by design, so kill what the test started."""
    for pidfile in (node.dir / "data" / "vms").glob("*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def exited(pid: int) -> bool:
    """Gone, or a zombie (a container's init may not reap the daemonized QEMU)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    need_guest()
    n = NodeProc(tmp_path, "a")
    n.start()
    try:
        yield n
    finally:
        kill_qemus(n)
        if n.proc is not None:
            n.stop()


def vm_json(node: NodeProc, *args: str) -> Any:
    r = node.cli("vm", *args, "--json", timeout=180)
    return json.loads(r.stdout.strip().splitlines()[-1])


def ticks(node: NodeProc, name: str) -> list[tuple[int, str]]:
    log = node.dir / "data" / "vms" / name / "console.log"
    return guest.console_ticks(log.read_bytes()) if log.exists() else []


def test_start_list_adopt_after_node_restart_and_stop(node: NodeProc) -> None:
    kernel, initrd = need_guest()
    (node.images / "g1.raw").write_bytes(bytes(DISK_MIB << 20))
    got = vm_json(
        node, "start", "g1", "--disk", "g1.raw", "--memory", "128M",
        "--kernel", str(kernel), "--initrd", str(initrd), "--append", guest.APPEND,
    )  # fmt: skip
    assert got["state"] == "running" and got["pid"] and got["disk"] == "g1.raw"
    assert got["owner"] is None  # no [consensus] here
    wait_until(lambda: len(ticks(node, "g1")) >= 3, "three ticks on the console", polls=1800)

    rows = vm_json(node, "list")["vms"]
    assert [(r["name"], r["state"]) for r in rows] == [("g1", "running")]
    assert set(rows[0]) >= {"name", "state", "pid", "disk", "owner", "epoch"}
    again = node.cli("vm", "start", "g1", check=False)
    assert again.returncode != 0 and "already running" in again.stderr

    # The VM outlives its node; the next node adopts it without a reboot.
    pid = got["pid"]
    node.stop()
    n_before = ticks(node, "g1")[-1][0]
    wait_until(lambda: ticks(node, "g1")[-1][0] > n_before, "ticks while the node is down")
    node.start()
    st = vm_json(node, "status", "g1")
    assert st["state"] == "running" and st["pid"] == pid
    boots = {b for _, b in ticks(node, "g1")}
    assert len(boots) == 1  # one boot: never restarted

    stopped = vm_json(node, "stop", "g1")
    assert stopped["was_running"] is True
    assert vm_json(node, "status", "g1")["state"] == "stopped"
    assert exited(pid)
    # Every tick the console showed is on the disk (the guest fsyncs each record).
    on_disk = guest.disk_ticks((node.images / "g1.raw").read_bytes())
    last = ticks(node, "g1")[-1][0]
    assert set(range(1, last)) <= set(on_disk), "a tick missing from the disk"


def test_clear_errors(node: NodeProc) -> None:
    r = node.cli("vm", "start", "nope", check=False)
    assert r.returncode == 2 and "--disk IMAGE" in r.stderr
    r = node.cli("vm", "start", "x", "--disk", "missing.raw", check=False)
    assert r.returncode == 2 and "not in this node's store" in r.stderr
    (node.images / "bad.raw").write_bytes(bytes(1 << 20))
    r = node.cli("vm", "start", "y", "--disk", "bad.raw", "--", "-no-such-option", check=False)
    assert r.returncode == 1 and "QEMU refused to start y" in r.stderr
    assert vm_json(node, "status", "y")["state"] == "stopped"
