"""The records of the ASS membership core: its configuration, members, suspicions, probes.

Why apart from ``swim``: they are plain data with no protocol logic; the core and the
service read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from dwcp.errors import UsageError
from dwcp.gossip.messages import ALIVE


@dataclass(frozen=True)
class SwimConfig:
    """memberlist's LAN defaults (probe 1 s / 0.5 s, 3 indirect checks, SuspicionMult 4)."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    """Until an RTT is measured; then clamp(3 x worst recent RTT, min_probe_timeout, interval/2)."""
    min_probe_timeout: float = 0.2
    indirect_checks: int = 3
    suspicion_mult: int = 4
    suspicion_max_mult: int = 6
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_dead: float = 30.0
    """Members dead for less than this still get gossip, so a live one learns it and refutes."""
    reconnect_interval: float = 30.0
    """Every this often a probe goes to a random dead member instead (serf's reconnect), so
    both sides of a healed partition find each other: admission says who to try."""
    awareness_max: int = 8
    packet_budget: int = 1400 - 64 - 40
    """Bytes of one message before the envelope (signature, sender, counter)."""
    push_pull_interval: float = 30.0
    """Anti-entropy: every this often (scaled with log n, ``pushpull.interval``) the whole
    member table is exchanged with one random member; 0 turns it off. Lifeguard mode only:
    plain SWIM has none, as in the Lifeguard paper's baseline."""
    push_pull_scale: bool = True
    """Scale ``push_pull_interval`` with log2 n as memberlist does (off: the same at any n)."""
    push_pull_chunk_bytes: int = 8192
    """Encoded bytes of one push-pull chunk (a datagram; the signature envelope is extra)."""
    lifeguard: bool = True

    def __post_init__(self) -> None:
        if self.probe_interval <= 0 or self.probe_timeout <= 0 or self.gossip_interval <= 0:
            raise UsageError("probe_interval, probe_timeout and gossip_interval must be > 0")
        if self.probe_timeout >= self.probe_interval:
            raise UsageError("probe_timeout must be shorter than probe_interval")
        if self.indirect_checks < 0 or self.suspicion_mult < 1 or self.gossip_nodes < 1:
            raise UsageError("indirect_checks >= 0, suspicion_mult >= 1, gossip_nodes >= 1")
        if self.push_pull_interval < 0 or not 512 <= self.push_pull_chunk_bytes <= 60000:
            raise UsageError("push_pull_interval >= 0 and push_pull_chunk_bytes in 512..60000")


class Change(NamedTuple):
    """A member's state or incarnation changed in this member's view."""

    time: float
    name: str
    old: int
    new: int
    incarnation: int
    by: str


class Member:
    __slots__ = ("heard", "inc", "name", "rtts", "since", "state", "susp")

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        self.state = ALIVE
        self.inc = 0
        self.since = now
        self.heard: float | None = None
        self.rtts: list[float] | None = None
        self.susp: Suspicion | None = None


class Suspicion:
    __slots__ = ("checked", "confirmed", "deadline", "pings", "start", "token")

    def __init__(self, start: float, origin: str, token: int) -> None:
        self.start = start
        self.checked = start
        """Since when the holder's own health is looked at before it acts (see ``swim``)."""
        self.pings = 0
        """Direct pings of the recheck under way (0: none)."""
        self.confirmed = {origin}
        self.deadline = start
        self.token = token


class Probe:
    __slots__ = ("acked", "expected_nacks", "nacks", "sent", "seq", "target")

    def __init__(self, seq: int, target: str, sent: float) -> None:
        self.seq = seq
        self.target = target
        self.sent = sent
        self.acked = False
        self.nacks = 0
        self.expected_nacks = 0
