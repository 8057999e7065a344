"""Test-only pause points of a live migration, so a fault can be injected in a known phase.

Why: the fault tests (``tests/vm/test_live_faults.py``) kill a node or cut the link while a
migration is in a given phase; racing a phase by timing would make them flaky. Only when
the node runs with ``DWCP_LIVE_TEST_HOLD`` set in its environment, a migration of VM NAME
whose directory (``DATA/vms/NAME``) holds a file ``test-hold`` naming one of ``POINTS``
stops at that point: it creates ``held-POINT`` there and waits until ``test-hold`` is
removed (at most ``HOLD_SECONDS``, then it goes on). Without the variable nothing is read.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

log = logging.getLogger("dwcp.live")
ENV = "DWCP_LIVE_TEST_HOLD"
# disk: mirror READY (NBD connected); ram: pre-copy running (crawling, see ``wanted``);
# switchover: source paused at pre-switchover; committing: QEMU completed and the
# destination has loaded the state, ownership not yet moved; run: ownership committed,
# the destination not yet told to run.
POINTS = ("disk", "ram", "switchover", "committing", "run")
HOLD_SECONDS = 300.0
CRAWL_BYTES_PER_SECOND = 1 << 20  # the RAM copy's rate while held at "ram"


def wanted(root: Path, point: str) -> bool:
    """Whether the test asked this migration to stop at ``point``."""
    if not os.environ.get(ENV):
        return False
    try:
        return (root / "test-hold").read_text().strip() == point
    except OSError:
        return False


async def hold(root: Path, point: str) -> None:
    """Stop at ``point`` while the test's ``test-hold`` file names it (bounded)."""
    if not wanted(root, point):
        return
    marker = root / f"held-{point}"
    marker.touch()
    log.warning("live migration held at %s (test hook %s)", point, ENV,
                extra={"event": "live_held"})  # fmt: skip
    loop = asyncio.get_running_loop()
    end = loop.time() + HOLD_SECONDS
    try:
        while (root / "test-hold").exists() and loop.time() < end:
            await asyncio.sleep(0.05)
    finally:
        marker.unlink(missing_ok=True)
