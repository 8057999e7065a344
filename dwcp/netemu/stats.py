"""Counters of an emulated link, copied out of the forwarder's live report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DirectionStats:
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    lost: int
    queue_drops: int
    overflow_drops: int
    write_errors: int
    max_queue_bytes: int
    late_ns_mean: float  # how late packets left versus their due time (emulator accuracy)
    late_ns_max: int

    @classmethod
    def from_c(cls, s: Any) -> DirectionStats:
        tx = int(s.tx_packets)
        return cls(
            rx_packets=int(s.rx_packets),
            rx_bytes=int(s.rx_bytes),
            tx_packets=tx,
            tx_bytes=int(s.tx_bytes),
            lost=int(s.lost),
            queue_drops=int(s.queue_drops),
            overflow_drops=int(s.overflow_drops),
            write_errors=int(s.write_errors),
            max_queue_bytes=int(s.max_queue_bytes),
            late_ns_mean=int(s.late_ns_sum) / tx if tx else 0.0,
            late_ns_max=int(s.late_ns_max),
        )


@dataclass(frozen=True)
class LinkStats:
    ab: DirectionStats  # packets sent by side a towards b
    ba: DirectionStats
    cpu_s: float  # CPU seconds of the forwarding loop
    wall_s: float
    wakeups: int = 0  # times the loop woke up (arrivals and due packets)

    @property
    def packets(self) -> int:
        return self.ab.rx_packets + self.ba.rx_packets

    @property
    def cpu_ns_per_packet(self) -> float:
        """Forwarder CPU per packet read (includes idle wake-ups)."""
        return self.cpu_s * 1e9 / self.packets if self.packets else 0.0

    @classmethod
    def from_c(cls, report: Any) -> LinkStats:
        return cls(
            ab=DirectionStats.from_c(report.ab),
            ba=DirectionStats.from_c(report.ba),
            cpu_s=int(report.cpu_ns) / 1e9,
            wall_s=int(report.wall_ns) / 1e9,
            wakeups=int(report.wakeups),
        )
