"""Sans-IO convergence of QEMU's RAM pre-copy: a ladder, rate-driven parameters, a clean abort.

QEMU switches over by itself once what remains fits its ``downtime-limit`` at the bandwidth it
measured. Two things keep that from happening on a WAN, and this core answers both:

- QEMU measures what it wrote into the relay's socket, not what crossed the link: a final pass
  that fits the socket buffers looks fast and the real downtime overshoots. So ``max-bandwidth``
  is set from the relay's measured rate (what the dwcp channel accepted under its bounded
  buffering, in QEMU's uncompressed bytes) with some headroom to let the rate grow, and the
  downtime limit QEMU is given is scaled by link rate / QEMU's rate when QEMU overestimates.
- A guest dirtying memory near the link rate never converges: after ``patience`` seconds
  without a switch-over while dirtying at >= ``near`` of the rate, climb a ladder: raise the
  downtime limit (straight to what the remainder needs, at least doubling) up to
  ``max_downtime_ms``; then QEMU's auto-converge, whose throttle increment is raised at each
  later rung; when the ladder is exhausted and the guest still outruns the link, or after
  ``timeout_s`` in the RAM phase, abort: the caller cancels the migration and the VM keeps
  running at the source.
- Only when asked (``Policy.postcopy``, ``--postcopy``) the last rung is postcopy instead of
  the abort (``Kind.POSTCOPY``): the destination runs the VM and pulls the pages it still
  lacks. It is never a default: from then on the VM's memory is split between two hosts
  and a lost link or source loses it (``dwcp.live.postcopy``).

Fed one ``Sample`` per ``query-migrate`` poll with ``now``; returns ``Action``s. No QMP, no
clock: tested in virtual time (tests/vm/test_converge.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

PAGE = 4096


class Kind(Enum):
    DOWNTIME = "downtime-limit"  # value: ms, for QEMU's migrate-set-parameters
    BANDWIDTH = "max-bandwidth"  # value: bytes/s
    AUTO_CONVERGE = "auto-converge"  # value: cpu-throttle-initial (%); enable the capability
    THROTTLE = "cpu-throttle-increment"  # value: %
    ABORT = "abort"  # value: 0; reason says why and what to do
    POSTCOPY = "postcopy"  # value: 0; switch to postcopy (only with Policy.postcopy)


@dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    value: int
    reason: str


@dataclass(frozen=True, slots=True)
class Sample:
    """One ``query-migrate`` answer plus the relay's measured rate."""

    now: float
    remaining: int  # ram.remaining, bytes
    dirty_rate: float  # ram.dirty-pages-rate * page size, bytes/s
    iteration: int  # ram.dirty-sync-count
    qemu_rate: float  # ram.mbps as bytes/s: what QEMU thinks it sends at
    link_rate: float | None  # bytes/s of QEMU's stream the channel accepted (None: not yet)

    @classmethod
    def from_query(cls, now: float, info: dict[str, object], link_rate: float | None) -> Sample:
        ram = info.get("ram")
        r: dict[str, object] = ram if isinstance(ram, dict) else {}

        def num(key: str) -> float:
            v = r.get(key, 0)
            return float(v) if isinstance(v, (int, float)) else 0.0

        page = num("page-size") or PAGE
        return cls(
            now=now,
            remaining=int(num("remaining")),
            dirty_rate=num("dirty-pages-rate") * page,
            iteration=int(num("dirty-sync-count")),
            qemu_rate=num("mbps") * 1e6 / 8,
            link_rate=link_rate,
        )


@dataclass(frozen=True, slots=True)
class Policy:
    downtime_ms: int = 300  # what the user asked for (QEMU's default)
    max_downtime_ms: int = 3000  # the ladder's cap (--max-downtime)
    timeout_s: float = 120.0  # the RAM phase's budget before a clean abort (--converge-timeout)
    patience_s: float = 8.0  # seconds without a switch-over before the next rung
    near: float = 0.7  # dirty rate / link rate at which the guest counts as outrunning it
    headroom: float = 1.25  # max-bandwidth = link rate * headroom (lets the rate grow)
    min_bandwidth: int = 1 << 20  # never throttle QEMU below this (bytes/s)
    throttle_initial: int = 30
    throttle_steps: tuple[int, ...] = (10, 20, 30)  # cpu-throttle-increment per later rung
    postcopy: bool = False  # the last rung: postcopy instead of the abort (--postcopy)


@dataclass
class Converger:
    policy: Policy
    start: float
    downtime_ms: int = 0  # what QEMU was last told (the user-facing figure, before scaling)
    sent_downtime: int = 0  # the scaled value QEMU was given
    bandwidth: int = 0
    rung: int = 0  # 0: none yet; then downtime raises, then auto-converge and throttle steps
    throttle: int = -1  # index into throttle_steps once auto-converge is on
    last_step: float = 0.0
    aborted: str | None = None
    postcopy: str | None = None  # why it switched to postcopy (the last rung, when asked)
    log: list[Action] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.downtime_ms = self.policy.downtime_ms
        self.last_step = self.start

    def feed(self, s: Sample) -> list[Action]:
        """The actions to apply after this sample (empty: leave QEMU alone)."""
        if self.aborted is not None or self.postcopy is not None:
            return []
        p = self.policy
        out: list[Action] = []
        rate = s.link_rate
        if rate is not None and rate > 0:
            out += self._bandwidth(rate)
        if s.now - self.start >= p.timeout_s:
            return self._abort(
                out,
                f"the guest did not converge within {p.timeout_s:.0f} s "
                f"(dirtying {s.dirty_rate / 1e6:.1f} MB/s, link {_mb(rate)}, "
                f"{s.remaining / 1e6:.1f} MB left)",
                "migrate it when it is idler, or raise --max-downtime / --converge-timeout",
            )
        # a rate of 0 is a stall, not a guest outrunning the link: the timeout handles it
        outrun = bool(rate) and s.iteration >= 2 and s.dirty_rate >= p.near * (rate or 0.0)
        if outrun and s.now - self.last_step >= p.patience_s:
            assert rate is not None
            step = self._next_rung(s, rate)
            if step is None:
                return self._abort(
                    out,
                    f"the guest dirties memory at {s.dirty_rate / 1e6:.1f} MB/s, faster than "
                    f"the link carries it ({_mb(rate)}), even at a {self.downtime_ms} ms "
                    "downtime limit with auto-converge",
                    "migrate it when it is idler, or raise --max-downtime",
                )
            self.last_step = s.now
            out += step
        out += self._downtime(s)
        self.log += out
        return out

    def _bandwidth(self, rate: float) -> list[Action]:
        want = max(self.policy.min_bandwidth, int(rate * self.policy.headroom))
        if self.bandwidth and abs(want - self.bandwidth) < 0.2 * self.bandwidth:
            return []
        self.bandwidth = want
        return [Action(Kind.BANDWIDTH, want, f"link carries {_mb(rate)}")]

    def _downtime(self, s: Sample) -> list[Action]:
        """QEMU's limit: the wanted downtime, scaled down when QEMU's own rate estimate is
        above what the link carries (its expected downtime would otherwise be too low)."""
        scale = 1.0
        if s.link_rate and s.qemu_rate > s.link_rate:
            scale = s.link_rate / s.qemu_rate
        val = max(10, int(self.downtime_ms * scale))
        if self.sent_downtime and abs(val - self.sent_downtime) < 0.15 * self.sent_downtime:
            return []
        self.sent_downtime = val
        why = f"{self.downtime_ms} ms wanted, QEMU's rate x{scale:.2f} of the link's"
        return [Action(Kind.DOWNTIME, val, why)]

    def _next_rung(self, s: Sample, rate: float) -> list[Action] | None:
        p = self.policy
        if self.downtime_ms < p.max_downtime_ms:
            need = int(s.remaining / rate * 1000 * 1.25)
            self.downtime_ms = min(p.max_downtime_ms, max(self.downtime_ms * 2, need))
            self.rung += 1
            return []  # _downtime sends it
        if self.throttle < 0:
            self.throttle = 0
            self.rung += 1
            return [
                Action(Kind.AUTO_CONVERGE, p.throttle_initial, "downtime cap reached"),
                Action(Kind.THROTTLE, p.throttle_steps[0], "auto-converge on"),
            ]
        if self.throttle + 1 < len(p.throttle_steps):
            self.throttle += 1
            self.rung += 1
            step = p.throttle_steps[self.throttle]
            return [Action(Kind.THROTTLE, step, "still outrunning the link")]
        return None

    def _abort(self, out: list[Action], what: str, advice: str) -> list[Action]:
        """The ladder is exhausted (or the time is up): abort, or postcopy when asked."""
        if self.policy.postcopy:
            self.postcopy = f"{what}: switching to postcopy"
            out.append(Action(Kind.POSTCOPY, 0, self.postcopy))
        else:
            self.aborted = f"{what}: {advice}"
            out.append(Action(Kind.ABORT, 0, self.aborted))
        self.log += out
        return out


def _mb(rate: float | None) -> str:
    return "unmeasured" if rate is None else f"{rate / 1e6:.1f} MB/s"


class RateMeter:
    """Bytes/s over a sliding window of (now, total) points: the relay's measured rate."""

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self.points: list[tuple[float, int]] = []

    def add(self, now: float, total: int) -> float | None:
        self.points.append((now, total))
        while len(self.points) > 2 and now - self.points[1][0] >= self.window:
            self.points.pop(0)
        t0, b0 = self.points[0]
        if now - t0 < min(1.0, self.window / 2):
            return None
        return (total - b0) / (now - t0)
