"""Link-rate traces: synthetic generators and the two file forms the emulator replays.

No public bandwidth-trace dataset is installable here (Debian's mahimahi-traces
is bullseye-only; the PyPI name list has none), so the predictor is evaluated
on seeded synthetic traces whose shapes are the ones the literature says
dominate prediction error (He, Dovrolis and Ammar: level shifts and outliers):

- ``steady``: one rate with small per-second jitter (a wired path, cross
  traffic averaging out);
- ``diurnal``: a daily cycle (compressed to ``period_s``) plus jitter;
- ``step``: a Markov-modulated rate, jumping between levels after exponential
  dwell times (a path whose bottleneck share changes as flows come and go);
- ``bursty``: a base rate with Poisson bursts of heavy cross traffic and
  Gilbert-Elliott loss, the rate falling to a fraction for a few seconds.

A trace is a list of ``Step(t, rate_bps, loss)``: the rate from ``t`` until
the next step. Files are either the simple form, one ``time_s rate_bps
[loss]`` line per step, or mahimahi's: one line per 1500-byte delivery
opportunity, its time in integer milliseconds (the trace repeats).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dwcp.errors import UsageError

MAHIMAHI_PACKET = 1500  # bytes per delivery opportunity
KINDS = ("steady", "diurnal", "step", "bursty")
DWELL_S = 180.0  # mean seconds between level shifts of a "step" trace


@dataclass(frozen=True, slots=True)
class Step:
    """From ``t`` seconds on, the link delivers ``rate_bps`` and drops ``loss`` of packets."""

    t: float
    rate_bps: float
    loss: float = 0.0


def generate(
    kind: str,
    *,
    seconds: int = 600,
    mean_bps: float = 50e6,
    seed: int = 1,
    period_s: float = 3600.0,
) -> list[Step]:
    """A seeded synthetic trace of ``seconds`` one-second steps around ``mean_bps``."""
    if kind not in KINDS:
        raise UsageError(f"trace kind {kind!r}: choose one of {', '.join(KINDS)}")
    if seconds < 1 or mean_bps <= 0:
        raise UsageError("a trace needs seconds >= 1 and mean_bps > 0")
    rng = random.Random(f"{kind}:{seed}")
    out: list[Step] = []
    if kind == "steady":
        for t in range(seconds):
            out.append(Step(t, mean_bps * rng.gauss(1.0, 0.03)))
    elif kind == "diurnal":
        phase = rng.uniform(0, 2 * math.pi)
        for t in range(seconds):
            cycle = 1.0 + 0.4 * math.sin(2 * math.pi * t / period_s + phase)
            out.append(Step(t, mean_bps * cycle * rng.gauss(1.0, 0.04)))
    elif kind == "step":
        levels = (0.5, 0.75, 1.0, 1.3)
        level = rng.choice(levels)
        dwell = rng.expovariate(1 / DWELL_S)
        for t in range(seconds):
            if dwell <= 0:
                level = rng.choice([x for x in levels if x != level])
                dwell = rng.expovariate(1 / DWELL_S)
            dwell -= 1
            out.append(Step(t, mean_bps * level * rng.gauss(1.0, 0.03)))
    else:  # bursty
        burst = 0
        depth = 1.0
        bad = False  # Gilbert-Elliott loss state
        for t in range(seconds):
            if burst == 0 and rng.random() < 1 / 25:
                burst = rng.randint(2, 6)
                depth = rng.uniform(0.25, 0.6)
            bad = rng.random() < (0.7 if bad else 0.03)
            loss = 0.02 if bad else 0.0
            share = depth if burst else 1.0
            burst = max(burst - 1, 0)
            out.append(Step(t, mean_bps * share * rng.gauss(1.0, 0.05), loss))
    return [Step(s.t, max(s.rate_bps, mean_bps * 0.05), s.loss) for s in out]


def rate_at(trace: Sequence[Step], t: float) -> Step:
    """The step in force at ``t`` (the first before the trace starts, the last after it ends)."""
    lo, hi = 0, len(trace) - 1
    if hi < 0:
        raise UsageError("the trace is empty")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if trace[mid].t <= t:
            lo = mid
        else:
            hi = mid - 1
    return trace[lo]


def per_second(trace: Sequence[Step], seconds: int | None = None) -> list[float]:
    """The mean rate (bits/s) over each whole second from the trace's start."""
    if not trace:
        return []
    t0 = trace[0].t
    end = seconds if seconds is not None else math.ceil(trace[-1].t - t0 + 1e-9) or 1
    out = []
    for s in range(end):
        a, b = t0 + s, t0 + s + 1
        bits = 0.0
        for i, step in enumerate(trace):
            nxt = trace[i + 1].t if i + 1 < len(trace) else math.inf
            lo, hi = max(a, step.t), min(b, nxt)
            if hi > lo:
                bits += step.rate_bps * (hi - lo)
        out.append(bits)
    return out


# --- files -------------------------------------------------------------------


def dumps(trace: Iterable[Step]) -> str:
    """The simple form: ``time_s rate_bps [loss]`` per line."""
    lines = []
    for s in trace:
        tail = f" {s.loss:.4g}" if s.loss else ""
        lines.append(f"{s.t:.3f} {s.rate_bps:.0f}{tail}")
    return "\n".join(lines) + "\n"


def loads(text: str) -> list[Step]:
    """Parse either form: mahimahi when every line is one integer, else ``time rate [loss]``."""
    rows = [ln.split("#", 1)[0].split() for ln in text.splitlines()]
    rows = [r for r in rows if r]
    if not rows:
        raise UsageError("the trace file has no steps")
    if all(len(r) == 1 for r in rows):
        return from_mahimahi(int(r[0]) for r in rows)
    out: list[Step] = []
    for n, r in enumerate(rows, 1):
        try:
            t, rate = float(r[0]), float(r[1])
            loss = float(r[2]) if len(r) > 2 else 0.0
        except (ValueError, IndexError):
            raise UsageError(
                f"trace line {n}: {' '.join(r)!r}: write 'time_s rate_bps [loss]'"
            ) from None
        if out and t <= out[-1].t:
            raise UsageError(f"trace line {n}: times must increase ({t} after {out[-1].t})")
        if rate < 0 or not 0 <= loss <= 1:
            raise UsageError(f"trace line {n}: rate must be >= 0 and loss in 0..1")
        out.append(Step(t, rate, loss))
    return out


def to_mahimahi(trace: Sequence[Step]) -> list[int]:
    """Delivery opportunities (ms) that give each second the trace's rate, carried over."""
    out: list[int] = []
    credit = 0.0
    rates = per_second(trace)
    for s, bits in enumerate(rates):
        per_ms = bits / 8 / MAHIMAHI_PACKET / 1000
        for ms in range(1000):
            credit += per_ms
            while credit >= 1.0:
                out.append(s * 1000 + ms + 1)
                credit -= 1.0
    return out


def from_mahimahi(times_ms: Iterable[int], bin_s: float = 1.0) -> list[Step]:
    """Rate steps of ``bin_s`` seconds from mahimahi delivery times (ms, non-decreasing)."""
    counts: dict[int, int] = {}
    last = 0
    for ms in times_ms:
        if ms < last:
            raise UsageError(f"mahimahi trace: time {ms} ms is before {last} ms")
        last = ms
        b = int((ms - 1) / 1000 / bin_s) if ms > 0 else 0
        counts[b] = counts.get(b, 0) + 1
    if not counts:
        raise UsageError("the mahimahi trace is empty")
    bits = MAHIMAHI_PACKET * 8 / bin_s
    return [Step(b * bin_s, counts.get(b, 0) * bits) for b in range(max(counts) + 1)]


def save(trace: Sequence[Step], path: Path) -> None:
    """Write the simple form durably (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(dumps(trace))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> list[Step]:
    try:
        return loads(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read trace {path}: {e.strerror}") from None
