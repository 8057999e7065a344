"""Undo or finish a live migration that a node crash (SIGKILL, power) interrupted.

What an operator expects: QEMU is the VM. It runs daemonized, outside the node's
process group, so a node crash leaves it alive; at restart the supervisor adopts it
and calls ``after_restart``, which settles it against the ownership registry, the
record that decides where the VM runs:

- QEMU running: nothing moves; leftovers of a migration (mirror job, NBD target) go.
- this node owns the VM: it must run here. An outgoing migration is cancelled and the
  VM resumed; an incoming one that had loaded the state (the source commits only after
  the destination said so) gets its staging disk put in place and resumes.
- another node owns it (or nobody): this QEMU is an incoming copy that never ran, or a
  source whose hand-over was committed: it quits, and a staging disk is removed.
- registry unreachable: the QEMU stays paused (never run a VM twice); a later restart
  or 'dwcp vm stop' settles it. Without ``[consensus]`` only an incoming copy that
  never finished loading is discarded; a paused source is left for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from dwcp.errors import DwcpError
from dwcp.live.host import VmHost
from dwcp.vm import definition as vmdef
from dwcp.vm.qmp import QmpClient

log = logging.getLogger("dwcp.live")
POLL = 0.1
SETTLE_SECONDS = 10.0
REGISTRY_SECONDS = 30.0


def staging_disks(vms: VmHost, disk: str) -> list[Path]:
    """Incoming live migrations' disk files of image ``disk`` (``.DISK.live-ID``)."""
    return sorted(vms.ctx.store.images_dir.glob(f".{disk}.live-*"))


async def undo_source(qmp: QmpClient) -> None:
    """Cancel what a migration left in the source QEMU: the migration, the mirror job and
    its NBD target; wait (bounded) for the cancel to settle. Each step may find nothing."""
    for cmd, a in (
        ("migrate_cancel", None),
        ("block-job-cancel", {"device": "m0", "force": True}),
    ):
        with contextlib.suppress(DwcpError):
            await qmp.execute(cmd, a)
    with contextlib.suppress(DwcpError):  # the job ends a moment after the cancel
        jobs = await qmp.execute("query-block-jobs")
        if any(j.get("device") == "m0" for j in jobs):
            await qmp.wait_event("BLOCK_JOB_CANCELLED", 5.0, match={"device": "m0"})
    with contextlib.suppress(DwcpError):
        await qmp.execute("blockdev-del", {"node-name": "tgt0"})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while loop.time() < deadline:
        with contextlib.suppress(DwcpError):
            st = (await qmp.execute("query-migrate")).get("status")
            if st not in ("cancelling", "active", "pre-switchover", "device", "setup"):
                break
        await asyncio.sleep(POLL)
    # the undone run's events (its mirror job's end) would be taken for the next run's
    for _ in qmp.take_events():
        pass


async def resume(qmp: QmpClient) -> None:
    with contextlib.suppress(DwcpError):
        if (await qmp.execute("query-status")).get("status") != "running":
            await qmp.execute("cont")


async def owner_of(vms: VmHost, name: str) -> str | None:
    """The registry's owner of ``name`` ("" for none); None when it cannot be asked."""
    own = vms.ctx.ownership
    if own is None:
        return None
    with contextlib.suppress(DwcpError, TimeoutError):
        async with asyncio.timeout(REGISTRY_SECONDS):
            return (await own.owner(name)).owner or ""
    return None


async def after_restart(vms: VmHost, name: str) -> str:
    """Settle VM ``name`` after the node restarted; returns what was done (logged)."""
    async with vms.lock(name):
        try:
            d = vmdef.load(vms.paths(name))
        except DwcpError:
            return "no definition"
        state, _ = await vms.state(name)
        staged = staging_disks(vms, d.disk)
        if state == "stopped":
            for f in staged:  # an incoming copy whose QEMU is gone: never ran
                f.unlink(missing_ok=True)
            done = "removed a staging disk" if staged else "nothing"
        elif state == "running":
            await undo_source(await vms.attach(name))
            done = "nothing (running)"
        else:
            done = await _settle(vms, name, d.disk, state, staged)
    if done != "nothing" and not done.startswith("nothing"):
        log.info("VM %s after restart: %s", name, done, extra={"event": "live_recovered"})
    return done


async def _settle(vms: VmHost, name: str, disk: str, state: str, staged: list[Path]) -> str:
    own = vms.ctx.ownership
    owner = await owner_of(vms, name)
    if owner is None and own is not None:
        return f"left {state}: the ownership registry cannot be reached"
    me = vms.ctx.key.public.node_id
    if owner == me:
        if state == "inmigrate":
            return "left inmigrate although owned here (the stream did not complete)"
        qmp = await vms.attach(name)
        if staged:  # an incoming migration that had loaded the state
            with contextlib.suppress(DwcpError):
                await qmp.execute("nbd-server-stop")
            await asyncio.to_thread(os.replace, staged[-1], vms.ctx.store.images_dir / disk)
        await undo_source(qmp)
        await resume(qmp)
        vms.paths(name).incoming.unlink(missing_ok=True)
        return "resumed (owned here)"
    if owner is None and state != "inmigrate":  # no registry: the operator decides
        return f"left {state}: no [consensus] registry says where it runs"
    await vms.quit(name, force=state == "inmigrate")
    for f in staged:
        f.unlink(missing_ok=True)
    return f"quit its QEMU ({state}): the VM is owned by {owner or 'no node'}"
