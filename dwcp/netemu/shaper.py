"""The per-packet loss and drop-tail decision of one direction, without any device.

A thin wrapper over the C model the forwarding loop uses (``dwcp_emu_admit``), so
tests and capacity planning can feed it packet arrivals and see the verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from dwcp._net import ffi, lib
from dwcp.netemu.params import Direction


class Verdict(IntEnum):
    PASS = lib.DWCP_EMU_PASS
    LOST = lib.DWCP_EMU_LOST
    QUEUE_FULL = lib.DWCP_EMU_QUEUE_FULL


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    deliver_ns: int  # meaningful for PASS only
    backlog_bytes: int  # queue backlog the packet found on arrival


class Shaper:
    """Feed packet arrivals (non-decreasing ``now_ns``) and get each packet's fate."""

    def __init__(self, direction: Direction, seed: int) -> None:
        self._params = direction.to_c(seed)
        self._state = ffi.new("dwcp_emu_shaper *")
        lib.dwcp_emu_shaper_init(self._state, self._params)
        self._deliver = ffi.new("uint64_t *")
        self._backlog = ffi.new("uint64_t *")

    def set_rate(self, rate_bps: float) -> None:
        """The bottleneck rate from now on (a trace step); what is queued keeps its times."""
        lib.dwcp_emu_set_rate(self._state, int(rate_bps))

    def admit(self, now_ns: int, length: int) -> Decision:
        v = lib.dwcp_emu_admit(self._state, now_ns, length, self._deliver, self._backlog)
        deliver = int(self._deliver[0]) if v == lib.DWCP_EMU_PASS else 0
        return Decision(Verdict(v), deliver, int(self._backlog[0]))
