"""Sans-IO phase machine of one live migration (source side): phases, deadlines, failure rule.

Why a separate core: the rule that decides where the VM runs after a failure
must not depend on sockets or clocks. Fed the phase reached and ``now``, it
says when the current wait expires and, on any failure, what must happen:
before the ownership commit the VM keeps running at the source and the
destination is cleaned up; once the commit is done the destination runs it.
In postcopy (``postcopy`` set at the switch-over, ``dwcp.live.postcopy``) the commit
comes before the destination has the VM's memory: after it, a failure leaves the source
paused and alive (it holds the pages the destination still lacks), never resumed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Phase(enum.Enum):
    CLAIM = "claiming"
    PREPARE = "preparing"  # destination QEMU started under -incoming defer, NBD export up
    DISK = "disk"  # NBD mirror of the disk until the job is READY
    RAM = "ram"  # RAM pre-copy until QEMU pauses the source at pre-switchover
    SWITCH = "switchover"  # mirror completed, final RAM and device state sent
    COMMIT = "committing"  # ownership owner=destination through PBFT
    RUN = "run"  # destination told to cont
    DONE = "done"


ORDER = list(Phase)

# Seconds each wait on a peer or on QEMU may take (the RAM/disk phases scale with size
# and link; these are upper bounds, after which the migration fails cleanly).
DEADLINES: dict[Phase, float] = {
    Phase.CLAIM: 30.0,
    Phase.PREPARE: 60.0,
    Phase.DISK: 600.0,
    Phase.RAM: 600.0,
    Phase.SWITCH: 60.0,
    Phase.COMMIT: 30.0,
    Phase.RUN: 30.0,
    Phase.DONE: 0.0,
}


class Outcome(enum.Enum):
    RESUME_SOURCE = "resume_source"  # cancel jobs, cont at the source, destination quits
    DESTINATION_RUNS = "destination_runs"  # the commit is done: the source QEMU quits
    HOLD_SOURCE = "hold_source"  # postcopy after the commit: the source stays paused, alive


@dataclass
class PhaseMachine:
    deadlines: dict[Phase, float] = field(default_factory=lambda: dict(DEADLINES))
    phase: Phase = Phase.CLAIM
    entered: float = 0.0
    committed: bool = False
    postcopy: bool = False  # this switch-over is postcopy's: memory moves after the commit
    history: list[tuple[Phase, float]] = field(default_factory=list)

    def start(self, now: float) -> None:
        self.phase, self.entered = Phase.CLAIM, now
        self.history = [(Phase.CLAIM, now)]

    def advance(self, to: Phase, now: float) -> None:
        """Enter ``to``; phases only move forward, one at a time or skipping none."""
        if ORDER.index(to) != ORDER.index(self.phase) + 1:
            raise ValueError(f"live migration cannot go from {self.phase.value} to {to.value}")
        if self.phase is Phase.COMMIT:
            self.committed = True  # leaving COMMIT means the commit returned ok
        self.phase, self.entered = to, now
        self.history.append((to, now))

    def deadline(self) -> float:
        """Absolute time at which the current phase's wait fails."""
        return self.entered + self.deadlines[self.phase]

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline() - now)

    def expired(self, now: float) -> bool:
        return self.phase is not Phase.DONE and now >= self.deadline()

    def on_failure(self) -> Outcome:
        """Where the VM must run after a failure in the current phase."""
        return self.settle(self.committed)

    def settle(self, owned_by_peer: bool) -> Outcome:
        """The rule once it is known whether the destination owns the VM."""
        if not owned_by_peer:
            return Outcome.RESUME_SOURCE
        return Outcome.HOLD_SOURCE if self.postcopy else Outcome.DESTINATION_RUNS

    def downtime(self) -> float | None:
        """Seconds from the source's pause (SWITCH entered) to the destination running."""
        at = dict(self.history)
        if Phase.SWITCH in at and Phase.DONE in at:
            return at[Phase.DONE] - at[Phase.SWITCH]
        return None
