"""Static configuration of one PBFT cluster (who the replicas and clients are, and the limits).

Every replica and client of a cluster must hold an identical ``ClusterConfig``: the
cluster id and protocol version go into every signature's domain tag, so a message
signed for another cluster or version never verifies here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from dwcp.errors import ConfigError
from dwcp.identity import PublicKey

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class ClusterConfig:
    """Membership and tuning of a PBFT cluster of ``n = 3f + 1`` replicas (ids ``0..n-1``)."""

    cluster_id: bytes
    replicas: tuple[PublicKey, ...]
    clients: tuple[PublicKey, ...]
    checkpoint_interval: int = 128
    """K: replicas exchange CHECKPOINT messages every K sequence numbers."""
    watermark_window: int = 256
    """L: a replica accepts PRE-PREPAREs for sequence numbers in (h, h + L]."""
    max_batch: int = 64
    """Most requests the primary puts in one PRE-PREPARE (one signature per batch)."""
    max_inflight: int = 4
    """Most PRE-PREPAREs the primary keeps proposed but not yet executed."""
    view_change_timeout: float = 1.0
    """Base timeout (s) before a backup suspects the primary; doubles per failed view change."""
    client_retry: float = 0.5
    """Client timeout (s) before it re-sends a request to every replica (doubles per retry)."""
    protocol_version: int = PROTOCOL_VERSION
    max_message_bytes: int = 16 << 20
    """Largest encoded message accepted (VIEW-CHANGE/NEW-VIEW carry whole certificates)."""
    max_request_bytes: int = 64 << 10
    """Largest encoded client REQUEST accepted (the operation and its signature)."""
    _client_index: dict[bytes, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.cluster_id, bytes) or not 1 <= len(self.cluster_id) <= 64:
            raise ConfigError("cluster_id must be 1..64 bytes")
        n = len(self.replicas)
        if n < 4 or (n - 1) % 3 != 0:
            raise ConfigError(f"a PBFT cluster needs n = 3f + 1 >= 4 replicas, got {n}")
        if len({k.raw for k in self.replicas}) != n:
            raise ConfigError("replica public keys must be distinct")
        if not self.clients:
            raise ConfigError("at least one client key must be authorised")
        if len({k.raw for k in self.clients}) != len(self.clients):
            raise ConfigError("client public keys must be distinct")
        k, window = self.checkpoint_interval, self.watermark_window
        if k < 1 or window < k or window % k != 0:
            raise ConfigError(
                "watermark_window must be a positive multiple of checkpoint_interval "
                f"(got K={k}, L={window}); the PBFT default is K=128, L=256"
            )
        if self.max_batch < 1 or self.max_inflight < 1:
            raise ConfigError("max_batch and max_inflight must be at least 1")
        if self.view_change_timeout <= 0 or self.client_retry <= 0:
            raise ConfigError("timeouts must be positive")
        if self.max_request_bytes < 256 or self.max_message_bytes < self.max_request_bytes:
            raise ConfigError("max_message_bytes must be >= max_request_bytes >= 256")
        index = {key.raw: i for i, key in enumerate(self.clients)}
        object.__setattr__(self, "_client_index", index)

    # Cached (the dataclass is frozen, so they never change): read for every message.
    @cached_property
    def n(self) -> int:
        return len(self.replicas)

    @cached_property
    def f(self) -> int:
        return (self.n - 1) // 3

    @cached_property
    def quorum(self) -> int:
        """2f + 1: matching votes needed to prepare, commit, or make a checkpoint stable."""
        return 2 * self.f + 1

    @cached_property
    def weak_quorum(self) -> int:
        """f + 1: enough that at least one honest replica is among them."""
        return self.f + 1

    def primary(self, view: int) -> int:
        return view % self.n

    def client_index(self, client: bytes) -> int | None:
        """Index of an authorised client's raw public key, or None if it is not authorised."""
        return self._client_index.get(client)
