"""Per-peer path history in the node's data directory, so a session to a known path starts warm.

Each peer has one small JSON file (``<data_dir>/paths/<node id>.json``) with the
per-second delivery rates, RTT and loss the transport measured in its last
sessions (at most ``KEEP`` seconds), the connections x streams the
parallelism controller ended on, and the errors of the predictions made for
that path (1 s ahead, scored when the next session's samples arrive; whole
transfers, when a migration reports its actual time). A new session reads it
to start at the level that worked instead of probing up from one connection,
and ``Predictor(history)`` to predict before any byte flows; ``dwcp paths``
prints it. Files are replaced atomically (temp file, fsync, rename), so a
crash leaves the old history, never half a file.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwcp.errors import UsageError
from dwcp.pba.parallelism import LinkSample
from dwcp.pba.predictor import Predictor, RateDistribution

KEEP = 600  # seconds of history per peer
RESUME_MIN_SECONDS = 3  # a careful resume needs at least this many seconds of history
RESUME_MAX_AGE = 24 * 3600.0  # and its newest second at most this old (s); the transport
# validates the jump anyway (a changed path costs one retreat), so the limit only bounds how
# stale a guess may be.
RESUME_RECENT = 30  # the stored RTT: the lowest of the last this many seconds
KEEP_ERRORS = 50
MIN_PARTIAL = 0.2  # seconds of bulk transfer below which a session leaves no sample
VERSION = 1
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True)
class Second:
    """One second of a session: when (wall clock), delivery rate, RTT and loss."""

    t: float
    rate_bps: float
    rtt_s: float
    loss: float


@dataclass
class PathRecord:
    """What this node knows about its path to one peer."""

    peer: str  # node id
    name: str = ""  # the peer's name in the configuration, when known
    seconds: list[Second] = field(default_factory=list)
    level: tuple[int, int] | None = None  # connections, streams at the end of the last session
    errors: list[dict[str, float | str]] = field(default_factory=list)

    def predictor(self) -> Predictor:
        return Predictor(s.rate_bps for s in self.seconds)

    def resume_hint(self, now: float) -> tuple[float, float] | None:
        """(rate bit/s, RTT s) for the transport's careful resume, or None (start cold).

        The rate is the predictor's P10 for the next second: a rate the path delivered
        nine times in ten, so the jump rarely overshoots and the transport's validation
        rarely has to retreat. The RTT is the lowest recent per-second RTT (the closest
        to the propagation delay the transport compares its first sample with).
        """
        if len(self.seconds) < RESUME_MIN_SECONDS or now - self.seconds[-1].t > RESUME_MAX_AGE:
            return None
        rate = self.predictor().predict(1.0).p10
        rtt = min(s.rtt_s for s in self.seconds[-RESUME_RECENT:])
        if not rate > 0 or not rtt > 0:
            return None
        return rate, rtt

    def summary(self, now: float) -> dict[str, Any]:
        """The ``dwcp paths --json`` row (a stable contract)."""
        row: dict[str, Any] = {"peer": self.peer, "name": self.name, "samples": len(self.seconds)}
        if self.seconds:
            d = self.predictor().predict(1.0)
            recent = self.seconds[-30:]
            row |= {
                "p10_bps": round(d.p10),
                "p50_bps": round(d.p50),
                "p90_bps": round(d.p90),
                "estimator": d.estimator,
                "rtt_ms": round(1000 * sorted(s.rtt_s for s in recent)[len(recent) // 2], 2),
                "loss": round(sum(s.loss for s in recent) / len(recent), 5),
                "age_s": round(max(now - self.seconds[-1].t, 0.0), 1),
            }
        else:
            row |= dict.fromkeys(("p10_bps", "p50_bps", "p90_bps", "rtt_ms", "loss", "age_s"))
        row["connections"], row["streams"] = self.level or (None, None)
        for kind in ("1s", "transfer"):
            errs = sorted(float(e["error"]) for e in self.errors if e["kind"] == kind)
            row[f"{kind}_error_median"] = round(errs[len(errs) // 2], 4) if errs else None
            row[f"{kind}_errors"] = len(errs)
        return row

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "peer": self.peer,
            "name": self.name,
            "seconds": [[s.t, s.rate_bps, s.rtt_s, s.loss] for s in self.seconds],
            "level": list(self.level) if self.level else None,
            "errors": self.errors,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PathRecord:
        level = doc.get("level")
        return cls(
            str(doc["peer"]),
            str(doc.get("name", "")),
            [Second(*map(float, row)) for row in doc.get("seconds", [])],
            (int(level[0]), int(level[1])) if level else None,
            list(doc.get("errors", [])),
        )


def to_seconds(samples: Iterable[LinkSample], wall_end: float) -> list[Second]:
    """The transport's samples (any interval) merged into whole seconds of delivery.

    Intervals that moved nothing (no bulk transfer running) are left out: they
    say nothing about the path. ``wall_end`` dates the last sample (the samples'
    ``now`` is the session's monotonic clock).
    """
    items = [s for s in samples if s.goodput_bps > 0 and s.interval > 0]
    if not items:
        return []
    shift = wall_end - items[-1].now
    out: list[Second] = []
    bits = span = rtt = loss = 0.0
    for s in items:
        bits += s.goodput_bps * s.interval
        span += s.interval
        rtt += s.rtt_s * s.interval
        loss += s.loss * s.interval
        if span >= 1.0 - 1e-9:
            out.append(Second(s.now + shift, bits / span, rtt / span, loss / span))
            bits = span = rtt = loss = 0.0
    if not out and span >= MIN_PARTIAL:
        # A transfer shorter than a second (fast paths move a small image in a few hundred
        # ms) still measured the path: keep its one partial second rather than nothing.
        out.append(Second(items[-1].now + shift, bits / span, rtt / span, loss / span))
    return out


class PathStore:
    """The path records under ``root`` (``<data_dir>/paths``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Sessions and migrations update a peer's file from worker threads at the same
        # moment (check-in, then the migration's result): without this one's
        # read-modify-write would undo the other's.
        self._lock = threading.Lock()

    def _file(self, peer: str) -> Path:
        if not peer or peer.startswith(".") or _SAFE.search(peer):
            raise UsageError(f"peer id {peer!r}: expected a node id (letters, digits, -_.)")
        return self.root / f"{peer}.json"

    def get(self, peer: str) -> PathRecord | None:
        path = self._file(peer)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None  # unreadable history is no history: the session probes as before
        try:
            return PathRecord.from_json(doc)
        except (ValueError, KeyError, TypeError, IndexError):
            return None

    def predict(self, peer: str, horizon_s: float = 1.0) -> RateDistribution | None:
        """The rate to ``peer`` over the next ``horizon_s`` seconds (P10/P50/P90), or None
        for a path with no history. The public entry point for planners (ITP's shares,
        the migration's ETA): ``horizon_s`` is the transfer's expected length."""
        rec = self.get(peer)
        if rec is None or not rec.seconds:
            return None
        return rec.predictor().predict(horizon_s)

    def all(self) -> list[PathRecord]:
        try:
            names = sorted(p.stem for p in self.root.glob("*.json"))
        except OSError:
            return []
        return [r for n in names if (r := self.get(n)) is not None]

    def put(self, rec: PathRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._file(rec.peer)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(rec.to_json(), f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def record_session(
        self,
        peer: str,
        seconds: Sequence[Second],
        *,
        name: str = "",
        level: tuple[int, int] | None = None,
    ) -> PathRecord:
        """Add a session's seconds; score the 1 s-ahead forecasts the history made for them."""
        with self._lock:
            return self._record_session(peer, seconds, name, level)

    def _record_session(
        self, peer: str, seconds: Sequence[Second], name: str, level: tuple[int, int] | None
    ) -> PathRecord:
        rec = self.get(peer) or PathRecord(peer)
        rec.name = name or rec.name
        if seconds:
            if rec.seconds:
                p = rec.predictor()
                for s in seconds:
                    f = p.predict(1.0).p50
                    rec.errors.append(
                        {"kind": "1s", "error": round(abs(f - s.rate_bps) / s.rate_bps, 4)}
                    )
                    p.observe(s.rate_bps)
            rec.seconds = (rec.seconds + list(seconds))[-KEEP:]
        rec.level = level or rec.level
        self._trim(rec)
        self.put(rec)
        return rec

    def record_transfer(self, peer: str, predicted_s: float, actual_s: float) -> None:
        """A transfer's predicted and actual time (``dwcp migrate`` reports both)."""
        with self._lock:
            rec = self.get(peer) or PathRecord(peer)
            err = abs(predicted_s - actual_s) / actual_s if actual_s > 0 else 0.0
            rec.errors.append({"kind": "transfer", "error": round(err, 4)})
            self._trim(rec)
            self.put(rec)

    @staticmethod
    def _trim(rec: PathRecord) -> None:
        ones = [e for e in rec.errors if e["kind"] == "1s"][-KEEP_ERRORS:]
        xfers = [e for e in rec.errors if e["kind"] == "transfer"][-KEEP_ERRORS:]
        rec.errors = ones + xfers
