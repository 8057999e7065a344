"""ASS, adaptive state sync: who is alive in the fleet, gossiped (SWIM with Lifeguard).

Admission is authoritative (the set of admitted node names and keys comes from the
cluster configuration, see ``dwcp.gossip.admission``); liveness is gossiped. The core
(``dwcp.gossip.swim.Swim``) is sans-IO: it is fed messages and ``now`` and returns the
messages to send, so the seeded virtual-time simulator (``dwcp.gossip.sim``) runs
thousands of members on one core and the asyncio binding stays thin.

Why SWIM with Lifeguard: probing one member per period keeps the load per member
independent of the fleet's size, suspicion with incarnation numbers lets a slow member
refute before it is declared dead, and Lifeguard's local health multiplier, nacks,
dynamic suspicion timeout and buddy system cut false positives on loaded hosts (the
flapping consul users hit before it).
"""

from __future__ import annotations

from dwcp.gossip.messages import ALIVE, DEAD, LEFT, STATE_NAMES, SUSPECT
from dwcp.gossip.records import Change, SwimConfig
from dwcp.gossip.swim import Swim

__all__ = ["ALIVE", "DEAD", "LEFT", "STATE_NAMES", "SUSPECT", "Change", "Swim", "SwimConfig"]
