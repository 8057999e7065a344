"""A migration's ETA from its path's prediction (PBA): before data flows, and as it streams.

Before the first frame, the only knowledge is the path history
(``PathStore``) and how many image bytes must be sent; compression is not
known yet, so the first prediction assumes the bytes go out as they are (an
upper bound for compressible images, exact for random ones). Once frames
flow, the measured ratio of wire to image bytes so far replaces that
assumption, and the rate is the path's prediction blended with what this
transfer has achieved (its own rate wins as it accumulates seconds), so the
ETA converges on the truth instead of holding a stale forecast.

Sans-IO: the caller passes elapsed seconds and the progress counters.
"""

from __future__ import annotations

from dataclasses import dataclass

from dwcp.pba.predictor import Predictor

TRUST_OWN_AFTER_S = 5.0  # seconds of this transfer after which its own rate counts as much


@dataclass
class MigrationEta:
    """ETA of one migration; ``predicted_seconds`` is fixed when sending starts."""

    predictor: Predictor | None
    predicted_seconds: float | None = None
    _send_started: float | None = None

    def start(self, elapsed_s: float, bytes_to_send: int) -> float | None:
        """Sending begins ``elapsed_s`` after the migration did: the total time predicted."""
        self._send_started = elapsed_s
        if self.predictor is None or self.predictor.samples == 0:
            return None
        self.predicted_seconds = round(elapsed_s + self.predictor.eta(bytes_to_send)[1], 3)
        return self.predicted_seconds

    def remaining(
        self, elapsed_s: float, bytes_to_send: int, bytes_sent: int, bytes_wire: int
    ) -> float | None:
        """Seconds still to go, or None when nothing is known yet."""
        if self._send_started is None:
            return None
        left = max(bytes_to_send - bytes_sent, 0)
        ratio = bytes_wire / bytes_sent if bytes_sent > 0 else 1.0
        wire_left = left * ratio
        spent = max(elapsed_s - self._send_started, 0.0)
        own = bytes_wire * 8 / spent if spent > 0 and bytes_wire > 0 else None
        path = (
            self.predictor.predict(1.0).p50 if self.predictor and self.predictor.samples else None
        )
        if own is None and path is None:
            return None
        if own is None or path is None:
            rate = own or path
        else:
            w = spent / (spent + TRUST_OWN_AFTER_S)
            rate = w * own + (1 - w) * path
        assert rate is not None
        return round(wire_left * 8 / max(rate, 1.0), 3)
