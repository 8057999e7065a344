"""The RAM pre-copy's QMP side: poll ``query-migrate``, feed ``converge``, apply its actions.

Thin by design: what to do lives in ``converge.Converger`` (sans-IO); this module only
turns its ``Action``s into ``migrate-set-parameters`` calls and an abort into a typed error
(the caller's failure rule then cancels the migration and resumes the source).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from dwcp.errors import MigrationAbortedError, UsageError, VmError
from dwcp.live.converge import Action, Converger, Kind, Policy, RateMeter, Sample
from dwcp.live.phases import PhaseMachine
from dwcp.node.control import Emit
from dwcp.vm.qmp import QmpClient

log = logging.getLogger("dwcp.live")
POLL = 0.1
DEFAULT_MAX_DOWNTIME_MS = 3000
DEFAULT_CONVERGE_SECONDS = 300.0

# auto-converge cannot be switched on once a migration runs (QEMU refuses capability
# changes then), so it is on from the start with a 1% ceiling: no throttle until the
# ladder lifts the ceiling (``Kind.AUTO_CONVERGE``).
START_CAPS = [{"capability": "auto-converge", "state": True}]
START_PARAMS = {"cpu-throttle-initial": 1, "max-cpu-throttle": 1, "cpu-throttle-increment": 1}


# QEMU's multifd: the RAM pages on this many more connections, each relayed on its own
# channel (``fanout``) over its own lane (session); 0: QEMU's single main stream. Off by
# default: on this CPU-bound 2-core machine multifd 4 was slower than one stream
# (benchmarks/RESULTS.md, "Live migration: multifd channels").
DEFAULT_MULTIFD = 0
MAX_MULTIFD = 16


def channels(multifd: Any, lanes: Any, postcopy: bool = False) -> tuple[int, int]:
    """(multifd channels, lanes) from the op's arguments; lanes default to one per channel."""
    n = DEFAULT_MULTIFD if multifd is None else int(multifd)
    if not 0 <= n <= MAX_MULTIFD:
        raise UsageError(f"--multifd takes 0 (off) to {MAX_MULTIFD} channels, not {n}")
    if n and postcopy:  # QEMU 7.2: "Postcopy is not yet compatible with multifd"
        raise UsageError("--postcopy needs QEMU's single stream: drop --multifd")
    k = n + 1 if lanes is None else int(lanes)
    if k < 1:
        raise UsageError(f"--lanes takes at least 1 session, not {k}")
    return n, k


def multifd_caps(n: int) -> list[dict[str, Any]]:
    return [{"capability": "multifd", "state": True}] if n else []


def multifd_params(n: int, qemu_zstd: bool = False) -> dict[str, Any]:
    """``qemu_zstd``: QEMU's multifd zstd-1 compresses (in its threads), the relay only
    copies; else the relay's zstd does (compression once either way, issue 12)."""
    if not n:
        return {}
    zstd = {"multifd-compression": "zstd", "multifd-zstd-level": 1} if qemu_zstd else {}
    return {"multifd-channels": n, **zstd}


async def incoming_multifd(qmp: QmpClient, multifd: Any, qemu_zstd: Any) -> None:
    """Destination: the source's multifd setting, before ``migrate-incoming``."""
    n = int(multifd or 0)
    if not 0 <= n <= MAX_MULTIFD:
        raise VmError(f"the source asked for {n} multifd channels (at most {MAX_MULTIFD})")
    if n:
        await qmp.execute("migrate-set-capabilities", {"capabilities": multifd_caps(n)})
        await qmp.execute("migrate-set-parameters", multifd_params(n, bool(qemu_zstd)))


def policy(
    downtime: int | None, max_downtime: int | None, timeout: float | None, postcopy: bool = False
) -> Policy:
    want = int(downtime) if downtime is not None else 300
    cap = int(max_downtime) if max_downtime is not None else DEFAULT_MAX_DOWNTIME_MS
    return Policy(
        downtime_ms=want,
        max_downtime_ms=max(want, cap),
        timeout_s=float(timeout) if timeout is not None else DEFAULT_CONVERGE_SECONDS,
        postcopy=postcopy,
    )


def params_of(action: Action) -> dict[str, int] | None:
    """QEMU's ``migrate-set-parameters`` arguments for one action (None: abort)."""
    if action.kind is Kind.DOWNTIME:
        return {"downtime-limit": action.value}
    if action.kind is Kind.BANDWIDTH:
        return {"max-bandwidth": action.value}
    if action.kind is Kind.AUTO_CONVERGE:
        return {"max-cpu-throttle": 99, "cpu-throttle-initial": action.value}
    if action.kind is Kind.THROTTLE:
        return {"cpu-throttle-increment": action.value}
    return None


async def wait_precopy(
    qmp: QmpClient,
    pm: PhaseMachine,
    conv: Converger,
    raw_sent: Callable[[], int],
    emit: Emit,
) -> dict[str, Any]:
    """Until QEMU pauses the source at ``pre-switchover``, or the converger's last rung is
    postcopy (``conv.postcopy`` set; QEMU still in pre-copy); ``MigrationAbortedError`` when
    it gives up. ``raw_sent``: QEMU's bytes the relay has put into its channel."""
    loop = asyncio.get_running_loop()
    meter = RateMeter()
    while True:
        now = loop.time()
        if pm.expired(now):
            raise VmError("the RAM copy did not reach pre-switchover in time")
        info: dict[str, Any] = await qmp.execute(
            "query-migrate", timeout=max(1.0, pm.remaining(now))
        )
        status = info.get("status")
        if status == "pre-switchover":
            return info
        if status in ("failed", "cancelled", "cancelling"):
            raise VmError(f"QEMU's migration {status}: {info.get('error-desc', '')}")
        rate = meter.add(now, raw_sent())
        if status == "active":
            for a in conv.feed(Sample.from_query(now, info, rate)):
                args = params_of(a)
                log.info("converge: %s %s (%s)", a.kind.value, a.value, a.reason,
                         extra={"event": "live_converge"})  # fmt: skip
                if a.kind is Kind.POSTCOPY:
                    return info
                if args is None:
                    raise MigrationAbortedError(a.reason)
                await qmp.execute("migrate-set-parameters", args)
        ram = info.get("ram", {})
        emit({"phase": pm.phase.value, "ram_sent": ram.get("transferred"),
              "ram_remaining": ram.get("remaining"), "downtime_limit_ms": conv.downtime_ms,
              "rung": conv.rung})  # fmt: skip
        await asyncio.sleep(POLL)


async def wait_status(
    qmp: QmpClient, pm: PhaseMachine, want: tuple[str, ...], emit: Emit
) -> dict[str, Any]:
    """Poll ``query-migrate`` until its status is one of ``want``, within the phase's time."""
    loop = asyncio.get_running_loop()
    while True:
        if pm.expired(loop.time()):
            raise VmError(
                f"the RAM copy did not reach {want[0]} in time (the guest may dirty memory "
                "faster than the link carries it: raise --downtime-limit)"
            )
        # the phase's deadline, not QMP's 10 s: QEMU holds its main lock while it sends
        # the final RAM and device state, so QMP answers only once that is across
        info: dict[str, Any] = await qmp.execute(
            "query-migrate", timeout=max(1.0, pm.remaining(loop.time()))
        )
        status = info.get("status")
        if status in want:
            return info
        if status in ("failed", "cancelled", "cancelling"):
            raise VmError(f"QEMU's migration {status}: {info.get('error-desc', '')}")
        ram = info.get("ram", {})
        log.info("migration %s %s", status, ram, extra={"event": "live_ram"})
        emit({"phase": pm.phase.value, "ram_sent": ram.get("transferred"),
              "ram_remaining": ram.get("remaining")})  # fmt: skip
        await asyncio.sleep(POLL)
