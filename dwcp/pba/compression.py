"""Sans-IO choice of the zstd level while a migration streams (PBA, predictive bandwidth
allocation: the compression half).

Which level is best depends on which side is slower. When the network is the
bottleneck, the encoder finishes each frame long before the transport takes
the next one, and a higher level buys fewer bytes on the wire with CPU that
would otherwise idle; when the CPU is the bottleneck (a fast link, a busy
host), the encoder is busy all the time and a lower level sends sooner. So,
like ``zstd --adapt``, the controller watches how busy the encoder thread is:
after each ``window`` frames it compares the encoder's busy time with the time
the sender took to consume those frames, raises the level while that share
is under ``RAISE_BELOW`` and lowers it above ``LOWER_ABOVE``. Busy time is the
encoder thread's CPU time: its wall time mostly measured waits for the GIL,
held by the Python QUIC stack, which a lower level does not shorten.

An idle encoder does not prove the network is the bottleneck: the sender's
Python QUIC stack may be the slow part, and then more compression steals its
CPU (two nodes on one 2-core host, the demo: 2.75 s instead of 2.0 s for a
cold migration). So the level rises only while the host has at least
``HOST_IDLE_RAISE`` of its CPU idle; on a saturated host it holds (a lower
level would send more bytes through a link that may well be the bottleneck,
and the VMs on a source host come first either way).

Measured (``benchmarks/migrate_bench.py``, 100 Mbit/s, 50 ms, 256 MiB ext4):
with CPU to spare, a cold migration climbs from 3 to 9 within its first 40
frames and puts 29.3-29.5 MB on the link instead of 30.6 MB at level 3.

The glue reports ``observe(busy, interval)`` per frame (seconds) and reads
``level`` before encoding the next frame; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_LEVEL = 1
MAX_LEVEL = 9  # 10+ cost 2-4x the CPU of 9 for under 1% fewer bytes on image data
WINDOW = 4  # frames (>= 1 MiB each) per decision
RAISE_BELOW = 0.4  # encoder busy share under which the network is the bottleneck
LOWER_ABOVE = 0.75  # ... and over which the CPU is
HOST_IDLE_RAISE = 0.25  # raise only with this share of the host's CPU idle


@dataclass
class AdaptiveLevel:
    """Picks the next frame's zstd level from how busy the encoder is."""

    level: int = 3
    lo: int = MIN_LEVEL
    hi: int = MAX_LEVEL
    window: int = WINDOW
    history: list[int] = field(default_factory=list)  # the level after every decision
    # The path's predicted rate (bit/s) when known: the source then starts at the level
    # ``dwcp.pba.zlevel.start_level`` picks from it and a measured sample of the image,
    # rather than at ``level``, and this controller corrects from there.
    predicted_bps: float | None = None
    _frames: int = 0
    _busy: float = 0.0
    _interval: float = 0.0
    _idle: float = 0.0  # host idle share x interval, summed
    _first: bool = True

    def __post_init__(self) -> None:
        if not self.lo <= self.hi:
            raise ValueError(f"level range {self.lo}..{self.hi} is empty")
        self.level = min(max(self.level, self.lo), self.hi)

    def start_at(self, level: int) -> None:
        """Go to ``level`` (kept inside lo..hi), before or while frames are observed: the
        window measured at the previous level starts over."""
        self.level = min(max(level, self.lo), self.hi)
        self.history.append(self.level)
        self._frames, self._busy, self._interval, self._idle = 0, 0.0, 0.0, 0.0

    def observe(self, busy: float, interval: float, host_idle: float = 1.0) -> None:
        """One frame was taken by the sender: the encoder's busy seconds since the
        previous one, the seconds between the two takes, and the share of the host's
        CPU that was idle meanwhile."""
        if self._first:
            self._first = False  # the first frame's wait is the pipeline filling
            return
        self._frames += 1
        interval = max(interval, 0.0)
        self._busy += max(busy, 0.0)
        self._interval += interval
        self._idle += min(max(host_idle, 0.0), 1.0) * interval
        if self._frames < self.window:
            return
        share = self._busy / self._interval if self._interval > 0 else 1.0
        idle = self._idle / self._interval if self._interval > 0 else 0.0
        if share > LOWER_ABOVE:
            self.level = max(self.level - 1, self.lo)
        elif share < RAISE_BELOW and idle >= HOST_IDLE_RAISE:
            self.level = min(self.level + 1, self.hi)
        self.history.append(self.level)
        self._frames, self._busy, self._interval, self._idle = 0, 0.0, 0.0, 0.0
