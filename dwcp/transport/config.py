"""Transport settings, with windows and socket buffers sized from the bandwidth-delay product."""

from __future__ import annotations

from dataclasses import dataclass

from dwcp.errors import UsageError
from dwcp.transport.tls import ALPN

KIB = 1 << 10
MIB = 1 << 20


def _clamp(value: float, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, value)))


@dataclass(frozen=True)
class TransportConfig:
    """How a session behaves. ``bandwidth_bps`` and ``rtt`` are hints for buffer sizing only.

    The defaults suit links up to ~1 Gbit/s x 100 ms; give the real link's
    figures to size flow-control windows and UDP buffers to its BDP.
    """

    idle_timeout: float = 30.0
    connect_timeout: float = 10.0
    bandwidth_bps: float = 1e9
    rtt: float = 0.05
    chunk: int = 256 * KIB
    window: int | None = None
    policy: str = "probe"
    initial_connections: int = 1
    initial_streams: int = 2
    max_connections: int = 8
    max_streams: int = 8
    interval: float = 0.5
    congestion: str = "dwcp-bbr"
    alpn: str = ALPN
    # Careful resume (dwcp.transport.resume): the path's known rate in bit/s and its RTT
    # in s: the first connection resumes it all, the others of ``initial_connections`` what
    # is left (``resume.jump_rate``), opened at connect; 0 = cold start (BBR's startup).
    resume_bps: float = 0.0
    resume_rtt: float = 0.0
    # Path MTU discovery (dwcp.transport.pmtud): datagrams past 1452 bytes where the path
    # carries them; off keeps every datagram at 1452 (a middlebox that mishandles probes).
    path_mtu_discovery: bool = True

    def __post_init__(self) -> None:
        if self.idle_timeout <= 0 or self.connect_timeout <= 0 or self.interval <= 0:
            raise UsageError("timeouts and the adaptation interval must be positive")
        if not 4 * KIB <= self.chunk <= 1 * MIB - 64:
            raise UsageError("chunk must be between 4 KiB and 1 MiB - 64 bytes")
        if self.resume_bps < 0 or self.resume_rtt < 0:
            raise UsageError("resume_bps and resume_rtt must be >= 0 (0 = cold start)")
        if self.window is not None and self.window < 2 * self.chunk:
            raise UsageError("the bulk window must hold at least two chunks")

    @property
    def bdp(self) -> int:
        """Bandwidth-delay product in bytes."""
        return int(self.bandwidth_bps / 8 * self.rtt)

    @property
    def bulk_window(self) -> int:
        """Bytes a bulk transfer may have unconsumed at the receiver (and unacked at the sender)."""
        if self.window is not None:
            return self.window
        return _clamp(2 * self.bdp, 16 * MIB, 256 * MIB)

    @property
    def stream_window(self) -> int:
        """Initial QUIC MAX_STREAM_DATA: one lane's share of the BDP, at least 1 MiB."""
        return _clamp(2 * self.bdp / max(1, self.initial_streams), MIB, 64 * MIB)

    @property
    def socket_buffer(self) -> int:
        """SO_RCVBUF / SO_SNDBUF so a full window of datagrams fits in the kernel."""
        return _clamp(2 * self.bdp, 4 * MIB, 64 * MIB)
