"""What one direction of an emulated link does to packets: rate, queue, delay, loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dwcp._net import ffi
from dwcp.errors import UsageError

MTU = 1500
MIN_QUEUE_PACKETS = 64


def direction_seed(seed: int, direction: str) -> int:
    """The loss seed of direction "ab" or "ba" of a link seeded with ``seed``."""
    return seed * 2 + (1 if direction == "ab" else 2)


@dataclass(frozen=True)
class Direction:
    """One direction of a link: packets meet loss, then the bottleneck queue, then the delay.

    ``rate_bps`` counts IP packet bytes (0 = unlimited). The drop-tail queue holds
    ``queue_bytes``, or ``queue_ms`` of the rate, or by default one round-trip
    bandwidth-delay product (2 x ``delay_ms``), never less than 64 full packets.
    """

    rate_bps: float = 100e6
    delay_ms: float = 25.0
    loss: float = 0.0
    queue_bytes: int | None = None
    queue_ms: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rate_bps <= 100e9:
            raise UsageError(f"rate_bps={self.rate_bps}: give 0 (unlimited) up to 100e9")
        if not 0 <= self.delay_ms <= 10_000:
            raise UsageError(f"delay_ms={self.delay_ms}: give a one-way delay in 0..10000 ms")
        if not 0 <= self.loss <= 1:
            raise UsageError(f"loss={self.loss}: give a probability in 0..1 (0.005 is 0.5%)")
        if self.queue_bytes is not None and self.queue_ms is not None:
            raise UsageError("give queue_bytes or queue_ms, not both")
        if self.queue_bytes is not None and self.queue_bytes < MTU:
            raise UsageError(f"queue_bytes={self.queue_bytes}: must hold a packet ({MTU} bytes)")
        if self.queue_ms is not None and self.queue_ms <= 0:
            raise UsageError(f"queue_ms={self.queue_ms}: must be > 0")

    @property
    def queue_limit(self) -> int:
        """The drop-tail limit in bytes."""
        if self.queue_bytes is not None:
            return self.queue_bytes
        ms = self.queue_ms if self.queue_ms is not None else 2 * self.delay_ms
        return max(int(self.rate_bps * ms / 8000), MIN_QUEUE_PACKETS * MTU)

    def to_c(self, seed: int) -> Any:
        """A ``dwcp_emu_params *`` for the C loop (``seed`` picks the loss sequence)."""
        p = ffi.new("dwcp_emu_params *")
        p.rate_bps = int(self.rate_bps)
        p.delay_ns = int(self.delay_ms * 1e6)
        p.queue_bytes = self.queue_limit
        p.loss = float(self.loss)
        p.seed = seed & 0xFFFF_FFFF_FFFF_FFFF
        return p

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "rate_bps": self.rate_bps,
            "delay_ms": self.delay_ms,
            "loss": self.loss,
            "queue_bytes": self.queue_bytes,
            "queue_ms": self.queue_ms,
        }
