"""Sans-IO adaptive parallelism: how many QUIC connections x streams a bulk transfer uses.

The glue feeds one ``LinkSample`` per interval (goodput, RTT, loss measured
over it); a policy, chosen by name from a registry like aioquic's congestion
controllers, returns the next ``Decision``. ``Controller.snapshot()`` exposes
inputs and decision so the bandwidth predictor (PBA) can watch or replace it.

The default "probe" policy climbs while goodput grows: more connections first
(each has its own congestion controller and pacer, so one random loss cuts
only its share, and measured on the emulated WAN they add capacity where
streams inside one connection do not), then more streams per connection
(which only shorten head-of-line blocking after a loss); after a step that
gained less than ``gain`` it steps back to the best level seen and holds
there for ``hold`` intervals before probing again, twice as long after each
further failed probe from the same level (up to ``max_hold``).

It probes only once goodput at the current level has stopped growing (the
first sample counts as growth from zero): a connection still in its startup
grows on its own, and adding connections then would credit them with that
growth. This matters most with the rate-based "dwcp-bbr" controller, which
fills the link with one connection; each extra one only adds its own probing
to the bottleneck queue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dwcp.errors import UsageError


@dataclass(frozen=True, slots=True)
class LinkSample:
    """What the glue measured over one interval."""

    now: float
    interval: float
    goodput_bps: float
    rtt_s: float
    loss: float
    connections: int
    streams: int


@dataclass(frozen=True, slots=True)
class Decision:
    """Connections and streams per connection to use next, and why."""

    connections: int
    streams: int
    reason: str


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 8
    max_streams: int = 8
    min_connections: int = 1
    min_streams: int = 1


class Policy(Protocol):
    """Turns samples into decisions; keeps whatever state it needs."""

    def decide(self, sample: LinkSample, limits: Limits) -> Decision: ...


PolicyFactory = Callable[[], Policy]
_POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str, factory: PolicyFactory) -> None:
    """Make a policy selectable by ``name`` (e.g. a PBA-driven one)."""
    _POLICIES[name] = factory


def create_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise UsageError(
            f"unknown parallelism policy {name!r}; choose one of {sorted(_POLICIES)}"
        ) from None


def policy_names() -> list[str]:
    return sorted(_POLICIES)


class ProbePolicy:
    """Hill-climb on goodput (see the module docstring)."""

    def __init__(
        self,
        *,
        gain: float = 0.05,
        hold: int = 8,
        max_hold: int = 64,
        loss_threshold: float = 0.002,
    ):
        self.gain = gain
        self.hold = hold
        self.max_hold = max_hold
        self.loss_threshold = loss_threshold
        self._best: tuple[float, int, int] | None = None  # goodput, conns, streams
        self._prev: tuple[float, int, int] | None = None  # the previous sample, likewise
        self._holding = 0
        self._failed = 0  # failed probes in a row from the current best level

    def decide(self, sample: LinkSample, limits: Limits) -> Decision:
        level = (sample.connections, sample.streams)
        prev = self._prev or (0.0, *level)
        self._prev = (sample.goodput_bps, *level)
        best = self._best
        growing = prev[1:] == level and sample.goodput_bps > prev[0] * (1 + self.gain)
        if self._holding and best is not None:
            self._holding -= 1
            if level == best[1:]:
                # Keep the best level's goodput fresh so the next probe compares fairly.
                self._best = ((best[0] + sample.goodput_bps) / 2, *level)
            return Decision(best[1], best[2], "holding the best level")
        if best is not None and level != best[1:]:
            if sample.goodput_bps <= best[0] * (1 + self.gain):
                self._holding = min(self.hold << self._failed, self.max_hold)
                self._failed += 1
                return Decision(best[1], best[2], f"step gained < {self.gain:.0%}: back and hold")
            self._failed = 0
            self._best = (sample.goodput_bps, *level)
        elif best is None or growing:
            self._best = (sample.goodput_bps, *level)
        else:
            # Averaged, so one interval that lost a burst does not make any probe look good.
            self._best = ((best[0] + sample.goodput_bps) / 2, *level)
        if growing:
            return Decision(*level, "goodput still growing at this level: wait")
        conns, streams = level
        if conns < limits.max_connections:
            why = f"loss {sample.loss:.2%}" if sample.loss > self.loss_threshold else "goodput grew"
            return Decision(conns + 1, streams, f"{why}: probe +1 connection")
        if streams < limits.max_streams:
            return Decision(conns, streams * 2 if streams < 4 else streams + 2, "probe streams")
        return Decision(conns, streams, "at the limits")


class FixedPolicy:
    """Never changes (benchmarks, tests, or an operator who knows the link)."""

    def decide(self, sample: LinkSample, limits: Limits) -> Decision:
        return Decision(sample.connections, sample.streams, "fixed")


register_policy("probe", ProbePolicy)
register_policy("fixed", FixedPolicy)


@dataclass
class Snapshot:
    """The controller's inputs and decisions so far (for PBA, metrics and `dwcp perf`)."""

    policy: str
    limits: Limits
    last_sample: LinkSample | None = None
    decision: Decision | None = None
    history: list[tuple[LinkSample, Decision]] = field(default_factory=list)


class Controller:
    """Feeds samples to the named policy and clamps its decisions to the limits."""

    def __init__(
        self,
        policy: str = "probe",
        *,
        limits: Limits | None = None,
        initial: tuple[int, int] = (1, 2),
        history: int = 256,
    ) -> None:
        self.limits = limits or Limits()
        self._policy = create_policy(policy)
        self._keep = history
        conns, streams = self._clamp(*initial)
        self.connections = conns
        self.streams = streams
        self.snap = Snapshot(policy=policy, limits=self.limits)

    def _clamp(self, conns: int, streams: int) -> tuple[int, int]:
        lim = self.limits
        return (
            max(lim.min_connections, min(lim.max_connections, conns)),
            max(lim.min_streams, min(lim.max_streams, streams)),
        )

    def feed(self, sample: LinkSample) -> Decision:
        decision = self._policy.decide(sample, self.limits)
        conns, streams = self._clamp(decision.connections, decision.streams)
        decision = Decision(conns, streams, decision.reason)
        self.connections, self.streams = conns, streams
        self.snap.last_sample = sample
        self.snap.decision = decision
        self.snap.history.append((sample, decision))
        del self.snap.history[: -self._keep]
        return decision

    def snapshot(self) -> Snapshot:
        return self.snap
