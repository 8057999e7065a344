"""What every part of a PBFT replica reads and moves: identity, view, execution point.

The replica (``replica.py``) is a facade over parts that each own their own state
(durability, normal case, checkpoints and state transfer, view change, recovery
after a lost log). The few facts all of them depend on live here, once, so no part
keeps a copy that could drift from another's.
"""

from __future__ import annotations

from collections import Counter

from dwcp.consensus.app import StateMachine
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.messages import Codec, Message
from dwcp.identity import NodeKey


class ReplicaContext:
    """Identity and the shared position of one replica (plain attributes, no behaviour
    beyond the few derived values every part needs)."""

    def __init__(
        self,
        config: ClusterConfig,
        replica_id: int,
        key: NodeKey,
        app: StateMachine,
        *,
        recovering: bool,
    ) -> None:
        self.config = config
        self.id = replica_id
        self.key = key
        self.app = app
        self.codec = Codec(config)
        self.stats: Counter[str] = Counter()
        self.view = 0
        self.active = True
        self.last_executed = 0
        self.stable_seq = 0
        # At-most-once reply cache: client index -> (last executed timestamp, result).
        self.clients: dict[int, tuple[int, bytes]] = {}
        # True while the write-ahead log is replayed: nothing is sent or persisted then.
        self.replaying = False
        # Lost-log recovery in progress: the replica must not vote.
        self.recovering = recovering
        # The request timer: a replica waiting too long for a request to execute (or for
        # a NEW-VIEW) moves to the next view. Armed by the normal case and the view change.
        self.vc_deadline: float | None = None
        # Consecutive view changes without progress (doubles the timeout each time).
        self.backoff = 0

    @property
    def is_primary(self) -> bool:
        return self.config.primary(self.view) == self.id

    def sign(self, msg: Message) -> bytes:
        return self.codec.encode(msg, self.id, self.key)

    def timeout(self) -> float:
        return self.config.view_change_timeout * float(1 << min(self.backoff, 16))

    def resend_interval(self) -> float:
        """How often our VIEW-CHANGE is re-sent: well inside the view-change timeout.

        Re-sending only once per timeout meant a single lost VIEW-CHANGE reached the new
        primary at the very moment the others gave the view up (the quorum's timer and the
        re-send fired together), so a 2% drop rate could skip views one after another.
        """
        return min(self.timeout() / 2, self.config.view_change_timeout)

    def window(self, seq: int) -> bool:
        """``seq`` lies between the low and high watermarks."""
        return self.stable_seq < seq <= self.stable_seq + self.config.watermark_window
