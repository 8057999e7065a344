"""The scheduler's state: tuning, per-source books and the transfer's report.

Kept apart from ``dwcp.itp.scheduler`` so the decisions there read on their own; these
are plain records with no rules of their own beyond a source's backlog.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

LIVE = "live"
DEAD = "dead"
EXCLUDED = "excluded"


@dataclass(frozen=True, slots=True)
class Config:
    """Tuning; the defaults are the research note's (seconds, fractions)."""

    stall_timeout: float = 1.0
    stall_pieces: float = 0.0  # 0: the stall time is stall_timeout alone
    max_revivals: int = 3
    measure_interval: float = 0.5
    replan_change: float = 1 / 3
    slow_ratio: float = 0.5
    endgame_budget: float = 0.01
    endgame_gain: float = 0.8
    min_window: int = 2
    max_window: int = 32
    default_rtt: float = 0.05


@dataclass(slots=True)
class Flight:
    """One request in flight: its size, when it was sent and how much has arrived."""

    size: int
    started: float
    received: int = 0
    endgame: bool = False


@dataclass(slots=True)
class SourceState:
    """The scheduler's book on one source: queue, requests in flight, rate samples, totals."""

    name: str
    rtt: float
    plan_rate: float
    state: str = LIVE
    reason: str = ""
    queue: deque[int] = field(default_factory=deque)
    queued_bytes: int = 0
    flights: OrderedDict[int, Flight] = field(default_factory=OrderedDict)
    deadline: float = 0.0
    stall_timeout: float = 0.0  # this source's; doubled at each revival
    stalled: bool = False  # dead by silence, not by a lost connection: may be revived
    revivals: int = 0
    sample_start: float | None = None
    sample_bytes: int = 0
    busy_since: float | None = None
    busy_time: float = 0.0
    bytes_wire: int = 0
    bytes_ok: int = 0
    chunks_ok: int = 0

    def backlog(self) -> int:
        return self.queued_bytes + sum(
            f.size - min(f.received, f.size) for f in self.flights.values()
        )


@dataclass(frozen=True, slots=True)
class SourceReport:
    """One source's share of a finished (or failed) transfer."""

    state: str
    reason: str
    bytes_wire: int
    bytes_ok: int
    chunks_ok: int
    busy_seconds: float


@dataclass(frozen=True, slots=True)
class Report:
    """What the transfer cost; ``duplicate_bytes`` are honest sources' bytes not used."""

    bytes_wire: int
    duplicate_bytes: int
    rejected_bytes: int
    sources: dict[str, SourceReport]
    events: list[tuple[float, str, str]]


class StuckError(Exception):
    """No live source holds some chunk (raised by ``Scheduler.check``)."""
