"""Offline evaluation of a predictor on a sequence of per-second rate samples.

Replays the samples in order; before each one it logs the 1 s-ahead forecast,
and every ``every`` seconds it predicts how long a transfer of a fixed size
would take if it started now, then measures how long it actually took on the
samples that follow (the last second counted fractionally). The metrics are
the ones issue 14 sets targets for: median absolute normalised 1 s-ahead
error, whole-transfer time MAPE, and the share of transfers whose actual time
fell inside the predicted P10-P90 interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dwcp.pba.predictor import RateDistribution


class PredictorLike(Protocol):
    def observe(self, rate_bps: float) -> None: ...
    def predict(self, horizon_s: float = 1.0) -> RateDistribution: ...
    def eta(self, nbytes: int) -> tuple[float, float, float]: ...


@dataclass
class Evaluation:
    """Errors of one predictor on one sample sequence; ``log`` holds every prediction."""

    onestep_mane: float  # median absolute normalised error, 1 s ahead
    transfer_mape: float  # mean absolute percentage error of the transfer time (fraction)
    coverage: float  # share of transfers with the actual time inside P10-P90
    transfers: int
    log: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, float | int]:
        return {
            "onestep_mane": round(self.onestep_mane, 4),
            "transfer_mape": round(self.transfer_mape, 4),
            "p10_p90_coverage": round(self.coverage, 3),
            "transfers": self.transfers,
        }


def actual_seconds(samples: Sequence[float], start: int, nbytes: int) -> float | None:
    """Seconds from ``start`` until ``nbytes`` have been delivered, or None if never."""
    need = nbytes * 8.0
    t = 0.0
    for x in samples[start:]:
        if x >= need:
            return t + need / x
        need -= x
        t += 1.0
    return None


def evaluate(
    samples: Sequence[float],
    make: Callable[[], PredictorLike],
    *,
    warmup: int = 60,
    transfer_s: float = 60.0,
    every: int = 5,
    history: Sequence[float] = (),
) -> Evaluation:
    """Replay ``samples`` (bits/s per second) through a fresh predictor from ``make``.

    Transfers are sized to take ``transfer_s`` seconds at the samples' mean rate;
    ``history`` is fed first, as a path store would (not scored).
    """
    p = make()
    for x in history:
        p.observe(x)
    mean = sum(samples) / max(len(samples), 1)
    nbytes = int(mean * transfer_s / 8)
    errs: list[float] = []
    apes: list[float] = []
    inside = 0
    log: list[dict[str, Any]] = []
    for t, x in enumerate(samples):
        if t >= warmup:
            f = p.predict(1.0)
            errs.append(abs(f.p50 - x) / x)
            log.append({"t": t, "kind": "1s", "actual_bps": x, **f.to_json()})
            if (t - warmup) % every == 0:
                real = actual_seconds(samples, t, nbytes)
                if real is not None:
                    lo, mid, hi = p.eta(nbytes)
                    apes.append(abs(mid - real) / real)
                    inside += lo <= real <= hi
                    log.append(
                        {
                            "t": t,
                            "kind": "transfer",
                            "bytes": nbytes,
                            "actual_s": round(real, 3),
                            "p10_s": round(lo, 3),
                            "p50_s": round(mid, 3),
                            "p90_s": round(hi, 3),
                        }
                    )
        p.observe(x)
    errs.sort()
    med = errs[len(errs) // 2] if errs else float("nan")
    n = len(apes)
    return Evaluation(
        med,
        sum(apes) / n if n else float("nan"),
        inside / n if n else float("nan"),
        n,
        log,
    )
