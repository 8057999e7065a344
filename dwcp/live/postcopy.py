"""Postcopy, the convergence ladder's last rung when asked (``--postcopy``): its QMP side.

Why: a guest that dirties memory faster than the link never finishes pre-copy, and the
ladder ends in a clean abort. With ``--postcopy`` it ends here instead: the destination
runs the VM and pulls the pages it still lacks (QEMU's ``postcopy-ram``, userfaultfd at
the destination), so the migration finishes in about one pass over the memory.

Order, so that ownership stays safe (the decision is ``converge.Kind.POSTCOPY``; the
failure rule is ``phases.Outcome``): the source is paused (``stop``) as at a normal
switch-over, the disk mirror completed, owner=destination COMMITTED through PBFT, and
only then ``migrate-start-postcopy``. A failed commit resumes the source (it stays the
owner) and the migration aborts cleanly.

The risk, which is why postcopy is never a default: once it has started, the VM's memory
lives on two hosts. A lost link or a dead source loses the VM's state unless QEMU's
postcopy recovery (``migrate-pause``; ``migrate-recover`` at the destination, then
``migrate`` with ``resume`` at the source) brings it back. dwcp does not drive that
recovery: it detects ``postcopy-paused`` (and a relay that moved no byte of QEMU's stream
for ``STALL_SECONDS``, which it turns into one with ``migrate-pause``: QEMU itself waits
on a silent socket for ever), reports it in one line that says what to do,
and leaves the source QEMU paused and alive (``Outcome.HOLD_SOURCE``): never both running.
A crash of the source node in postcopy is not recovered either: at its restart ``recover``
finds the destination owning the VM and quits the source QEMU, so the pages that had not
crossed yet are lost with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from dwcp.errors import VmError
from dwcp.live.phases import PhaseMachine
from dwcp.node.control import Emit
from dwcp.vm.qmp import QmpClient, QmpError

log = logging.getLogger("dwcp.live")
POLL = 0.1
CAPS = [{"capability": "postcopy-ram", "state": True}]
FINISH_SECONDS = 600.0  # the pages left after the switch: at most one pass over the RAM
CONT_SECONDS = 90.0  # the destination's cont: its main loop may fault on missing pages
RUN_SECONDS = 120.0  # the source's wait for switch + that cont (phases.Phase.RUN)
STALL_SECONDS = 10.0  # no byte of QEMU's stream relayed for this long: the link is lost


class Stall:
    """Sans-IO: whether a byte count has not moved for ``seconds`` (fed ``now``, the count)."""

    def __init__(self, seconds: float, now: float) -> None:
        self.seconds, self.since, self.total = seconds, now, -1

    def feed(self, now: float, total: int) -> bool:
        if total != self.total:
            self.total, self.since = total, now
        return now - self.since >= self.seconds


def caps(on: bool) -> list[dict[str, Any]]:
    return list(CAPS) if on else []


async def enable_incoming(qmp: QmpClient) -> None:
    """Destination, before ``migrate-incoming``: QEMU checks userfaultfd here."""
    try:
        await qmp.execute("migrate-set-capabilities", {"capabilities": CAPS})
    except QmpError as exc:
        raise VmError(
            f"this node cannot take a postcopy migration ({exc}): QEMU needs userfaultfd "
            "(run the node as root, or 'sysctl vm.unprivileged_userfaultfd=1'); or migrate "
            "without --postcopy"
        ) from None


def paused_error(name: str, peer: str) -> VmError:
    return VmError(
        f"postcopy of VM {name} to {peer} paused (postcopy-paused: the link or a QEMU broke "
        f"while the VM's memory was split between here and {peer}); both copies stay "
        f"paused, neither runs: restore the link and recover it with QEMU's migrate-recover "
        f"at {peer} and 'migrate resume=true' here, or its memory state is lost ('dwcp vm "
        f"stop {name}' on both nodes, then start it from its disk at {peer})"
    )


async def _status(qmp: QmpClient, deadline: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    left = deadline - loop.time()
    if left <= 0:
        raise VmError("QEMU's postcopy did not finish in time")
    info: dict[str, Any] = await qmp.execute("query-migrate", timeout=max(1.0, left))
    return info


async def switch(qmp: QmpClient, pm: PhaseMachine, name: str, peer: str) -> bool:
    """After the commit: start postcopy. True once QEMU runs it; False when the paused
    source's pre-copy finished first (it then completes as a normal switch-over)."""
    loop = asyncio.get_running_loop()
    await qmp.execute("migrate-start-postcopy")
    while True:
        info = await _status(qmp, pm.deadline())
        st = info.get("status")
        if st == "pre-switchover":  # pause-before-switchover holds postcopy's start too
            await qmp.execute("migrate-continue", {"state": "pre-switchover"},
                              timeout=max(1.0, pm.remaining(loop.time())))  # fmt: skip
        elif st in ("postcopy-active", "completed"):
            return st == "postcopy-active" or bool(info.get("ram", {}).get("postcopy-requests"))
        elif st in ("postcopy-paused", "postcopy-recover"):
            raise paused_error(name, peer)
        elif st in ("failed", "cancelled", "cancelling"):
            raise VmError(f"QEMU's postcopy {st}: {info.get('error-desc', '')}")
        await asyncio.sleep(POLL)


async def finish(
    qmp: QmpClient, name: str, peer: str, emit: Emit, raw_sent: Callable[[], int]
) -> dict[str, Any]:
    """The destination runs the VM: wait (bounded) until the last page has left.
    ``raw_sent``: QEMU's bytes the relay has taken (a stall means the link is gone)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FINISH_SECONDS
    stall = Stall(STALL_SECONDS, loop.time())
    while True:
        info = await _status(qmp, deadline)
        st = info.get("status")
        log.info("postcopy %s %s", st, info.get("ram"), extra={"event": "live_postcopy"})
        if st == "completed":
            return info
        if st in ("postcopy-paused", "postcopy-recover"):
            raise paused_error(name, peer)
        if stall.feed(loop.time(), raw_sent()):  # pause it: recoverable, unlike a cancel
            with contextlib.suppress(VmError):
                await qmp.execute("migrate-pause")
            raise paused_error(name, peer)
        if st in ("failed", "cancelled", "cancelling"):
            raise VmError(
                f"QEMU's postcopy {st} ({info.get('error-desc', '')}): VM {name}'s memory "
                f"state at {peer} is incomplete; 'dwcp vm stop {name}' there and start it "
                "from its disk"
            )
        ram = info.get("ram", {})
        emit({"phase": "postcopy", "ram_sent": ram.get("transferred"),
              "ram_remaining": ram.get("remaining")})  # fmt: skip
        await asyncio.sleep(POLL)
