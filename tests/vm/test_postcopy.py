"""``dwcp migrate --live --postcopy``: a TCG guest dirtying memory faster than the link.

Real daemons, a 4-replica ownership registry, and a link held to LINK bytes/s while the
guest rewrites about twice that. The ladder is given no room (a 10 ms downtime cap, a 2 s
budget), so without --postcopy it would abort; with it the last rung is postcopy: owner=b
is committed first, then b runs the VM while the pages it lacks still flow; the counter
goes on at b (same boot) and the source QEMU exits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from node.cluster import wait_until

from dwcp.vm import guest
from vm.faultworld import FaultNode, FaultWorld, disk_ticks, kill_qemu
from vm.guestfix import need_guest
from vm.test_supervisor import exited, ticks

LINK = 6e6  # bytes/s a -> b
DIRTY_KIB, WS_MIB = 12 << 10, 24


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FaultWorld]:
    need_guest()
    w = FaultWorld(tmp_path, rate=getattr(request, "param", LINK))
    try:
        yield w
    finally:
        for n in (w.a, w.b):
            kill_qemu(n, "g1")
        w.close()


def start_dirtier(w: FaultWorld) -> str:
    """VM g1 at a, rewriting its memory; its boot id once it ticks."""
    kernel, initrd = need_guest()
    (w.a.images / "g1.raw").write_bytes(bytes(4 << 20))
    w.a.cli(
        "vm", "start", "g1", "--disk", "g1.raw", "--memory", "128M",
        "--kernel", str(kernel), "--initrd", str(initrd),
        "--append", guest.dirty_append(DIRTY_KIB, WS_MIB),
    )  # fmt: skip
    wait_until(lambda: len(ticks(w.a, "g1")) >= 3, "three ticks on the console", polls=2400)
    return ticks(w.a, "g1")[-1][1]


def state(node: FaultNode) -> str:
    """``vm status``'s state, "" when QEMU is slow to answer (in postcopy its main loop
    may wait on a missing page: QMP stays silent meanwhile)."""
    r = node.cli("vm", "status", "g1", "--json", timeout=120, check=False)
    return str(json.loads(r.stdout.strip().splitlines()[-1])["state"]) if r.returncode == 0 else ""


POSTCOPY = ("migrate", "--live", "g1", "--to", "b", "--postcopy", "--json", "--downtime-limit",
            "10", "--max-downtime", "10", "--converge-timeout", "2")  # fmt: skip


@pytest.mark.slow  # ~20-25 s: two TCG boots' worth of QEMU work and a 4-replica registry
def test_postcopy_moves_a_guest_that_outruns_the_link(world: FaultWorld) -> None:
    w = world
    boot = start_dirtier(w)
    pid = w.a.vm_status("g1")["pid"]
    r = w.a.cli(*POSTCOPY, timeout=240)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["result"] == "completed" and res["postcopy"] is True, res
    assert res["owner"] == w.b.node_id()
    last = max(t for t, _ in ticks(w.a, "g1"))
    assert exited(pid), "the source QEMU still runs"
    assert w.a.vm_status("g1").get("state") == "stopped"
    assert w.b.vm_status("g1")["state"] == "running"
    wait_until(lambda: any(t > last for t, _ in ticks(w.b, "g1")), "ticks at b", polls=1800)
    assert {bt for _, bt in ticks(w.b, "g1")} == {boot}
    # the disk holds every write: the mirror was completed before b ran it
    end = max(t for t, _ in ticks(w.b, "g1"))
    w.b.cli("vm", "stop", "g1")
    on_disk = disk_ticks(w.b, "g1.raw")
    assert set(range(1, end)) <= set(on_disk), "a tick missing from the disk"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2e6], indirect=True)  # a slower link: a longer postcopy
def test_a_link_cut_in_postcopy_is_reported_and_never_runs_both(world: FaultWorld) -> None:
    # once b runs the VM, its memory is split: the cut must be reported (postcopy-paused),
    # the source kept paused and alive (it holds the pages b lacks), never resumed
    w = world
    start_dirtier(w)
    pid = w.a.vm_status("g1")["pid"]
    proc = w.a.popen_cli(*POSTCOPY)
    # b's QEMU runs once b says so: the guest there barely ticks yet (its faults wait
    # behind the background pages on QEMU's one stream), the pages still flow
    wait_until(lambda: state(w.b) == "running" or proc.poll() is not None, "b running the VM",
               polls=3000, interval=0.1)  # fmt: skip
    assert proc.poll() is None, proc.communicate()
    w.link.cut = True
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "postcopy-paused" in err, err
    assert "migrate-recover" in err  # the one line says what to do
    assert not exited(pid), "the source QEMU quit: the pages b lacks are gone"
    assert w.a.vm_status("g1")["state"] != "running"
