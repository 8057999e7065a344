"""Sans-IO PBFT replica (Castro & Liskov): fed bytes and ``now``, returns actions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from dwcp.consensus.actions import Action
from dwcp.consensus.app import StateMachine
from dwcp.consensus.config import ClusterConfig
from dwcp.errors import ConfigError
from dwcp.identity import NodeKey


class Replica:
    """One PBFT replica."""

    def __init__(
        self,
        config: ClusterConfig,
        replica_id: int,
        key: NodeKey,
        app: StateMachine,
        *,
        recovering: bool = False,
    ) -> None:
        if not 0 <= replica_id < config.n or config.replicas[replica_id] != key.public:
            raise ConfigError("replica_id does not match this key in ClusterConfig.replicas")
        self.config = config
        self.id = replica_id
        self.key = key
        self.app = app
        self.stats: Counter[str] = Counter()
        self.view = 0
        self.last_executed = 0
        self.stable_seq = 0
        self.recovering = recovering

    def receive(self, data: bytes, now: float) -> list[Action]:
        return []

    def tick(self, now: float) -> list[Action]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def recover(self, records: Iterable[bytes], now: float) -> list[Action]:
        return []
