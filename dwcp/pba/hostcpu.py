"""How much of the host's CPU is idle (PBA: the CPU left for compression).

Read from /proc/stat, so the caller decides when to sample; the zstd level
controller (``dwcp.pba.compression``) holds its level on a saturated host.
"""

from __future__ import annotations


class HostCpu:
    """The share of the host's CPU time that was idle between two calls (/proc/stat)."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", "rb") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total

    def idle_share(self) -> float:
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[1] <= last[1]:
            return 1.0  # unknown: do not hold the level back
        return (now[0] - last[0]) / (now[1] - last[1])
