"""Replay a link-rate trace on a running ``Link``: each step's rate at its time.

A thread (not per-packet work: one ``set_rate`` per step, the forwarder applies
it at the next packet) so the benchmark's own loop stays free. The steps come
from ``dwcp.pba.traces`` (synthetic, or a file in the simple or mahimahi form).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from types import TracebackType

from dwcp.netemu.link import Link
from dwcp.pba.traces import Step


class TraceReplay:
    """``with TraceReplay(link, steps, both=True):`` steps the link's rate until the block ends."""

    def __init__(self, link: Link, steps: Sequence[Step], *, both: bool = False) -> None:
        self.link = link
        self.steps = list(steps)
        self.both = both
        self.applied = 0  # steps applied so far
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trace-replay", daemon=True)

    def __enter__(self) -> TraceReplay:
        self.started = time.monotonic()
        if self.steps:
            self._apply(self.steps[0])
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _apply(self, step: Step) -> None:
        rate = max(step.rate_bps, 1e3)
        self.link.set_rate(rate, rate if self.both else None)
        self.applied += 1

    def _run(self) -> None:
        if not self.steps:
            return
        t0 = self.steps[0].t
        for step in self.steps[1:]:
            due = self.started + step.t - t0
            if self._stop.wait(max(due - time.monotonic(), 0.0)):
                return
            self._apply(step)
