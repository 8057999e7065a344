"""Sans-IO PBFT client: signs requests, retries, and accepts f + 1 matching signed replies.

A reply is a REPLY or, for a batch, this client's entry in a REPLIES message
(one signature for the whole batch); ``Completed.proof`` holds those messages.

One request may be outstanding per client (PBFT's reply cache keeps the last
timestamp per client; a second concurrent request could be ordered first and
make the earlier one stale). Run several clients (keys) for concurrency.
"""

from __future__ import annotations

from collections import Counter

from dwcp.consensus.actions import Action, Broadcast, ClientEvent, Completed, Send
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.messages import Codec, Replies, Reply, Request, Signed
from dwcp.errors import AuthenticationError, ConfigError, ProtocolError, UsageError
from dwcp.identity import NodeKey


class Client:
    """State machine of one client; ``client_id`` is its raw public key."""

    def __init__(self, config: ClusterConfig, key: NodeKey, *, codec: Codec | None = None) -> None:
        index = config.client_index(key.public.raw)
        if index is None:
            raise ConfigError("this client's public key is not in ClusterConfig.clients")
        self.config = config
        self.key = key
        self.index = index
        self.client_id = key.public.raw
        # Clients in one process may share a codec, so a REPLIES message is verified once.
        self.codec = codec if codec is not None else Codec(config)
        self.view = 0
        self.stats: Counter[str] = Counter()
        self._last_ts = 0
        self._ts: int | None = None
        self._op = b""
        self._raw = b""
        self._replies: dict[int, tuple[int, bytes, bytes]] = {}
        self._deadline: float | None = None
        self._retries = 0

    @property
    def busy(self) -> bool:
        """True while a request is outstanding."""
        return self._ts is not None

    def advance_timestamp(self, ts: int) -> None:
        """Make the next request's timestamp exceed ``ts`` (e.g. wall-clock microseconds,
        so a restarted client is not mistaken for a replay of its earlier requests)."""
        self._last_ts = max(self._last_ts, ts - 1)

    def abandon(self) -> None:
        """Stop waiting for the outstanding request (it may still execute, at most once)."""
        self._ts = None
        self._deadline = None
        self._replies = {}

    def request(self, op: bytes, now: float) -> list[Action]:
        """Sign ``op`` and send it to the primary this client believes in."""
        if self._ts is not None:
            raise UsageError("a request is already outstanding; wait for Completed")
        ts = max(self._last_ts + 1, int(now * 1_000_000))
        self._last_ts = ts
        self._ts, self._op = ts, op
        self._raw = self.codec.encode(Request(ts, op), self.index, self.key)
        if len(self._raw) > self.config.max_request_bytes:
            self._ts = None
            raise UsageError(
                f"request of {len(self._raw)} bytes exceeds max_request_bytes "
                f"({self.config.max_request_bytes})"
            )
        self._replies = {}
        self._retries = 0
        self._deadline = now + self.config.client_retry
        return [Send(self.config.primary(self.view), self._raw)]

    def receive(self, data: bytes, now: float) -> list[ClientEvent]:
        """Handle a REPLY; invalid or unrelated replies are dropped and counted in ``stats``."""
        try:
            s = self.codec.decode(data)
        except ProtocolError:
            self.stats["malformed"] += 1
            return []
        return self.receive_decoded(s, now)

    def receive_decoded(self, s: Signed, now: float) -> list[ClientEvent]:
        """``receive`` for a message already parsed with ``Codec.decode`` (not yet verified)."""
        msg = s.msg
        result: bytes | None
        if isinstance(msg, Reply):
            ok = msg.client == self.index and msg.timestamp == self._ts
            result = msg.result if ok else None
        elif isinstance(msg, Replies):
            result = None if self._ts is None else msg.result_for(self.index, self._ts)
        else:
            self.stats["unexpected"] += 1
            return []
        if result is None or self._ts is None:
            self.stats["stale"] += 1
            return []
        if s.sender in self._replies:
            self.stats["duplicate"] += 1
            return []
        try:
            self.codec.verify(s)
        except AuthenticationError:
            self.stats["bad_signature"] += 1
            return []
        self._replies[s.sender] = (msg.view, result, s.raw)
        matching = [(v, raw) for v, r, raw in self._replies.values() if r == result]
        if len(matching) < self.config.weak_quorum:
            return []
        views = Counter(v for v, _ in matching)
        self.view = max(views, key=lambda v: (views[v], v))
        event = Completed(self._ts, self._op, result, tuple(raw for _, raw in matching))
        self._ts = None
        self._deadline = None
        self._replies = {}
        return [event]

    def tick(self, now: float) -> list[Action]:
        """On timeout re-send the request to every replica (backups forward it to the primary)."""
        if self._deadline is None or now < self._deadline or self._ts is None:
            return []
        self._retries += 1
        self.stats["retries"] += 1
        self._deadline = now + self.config.client_retry * min(2**self._retries, 64)
        return [Broadcast(self._raw)]

    def next_deadline(self) -> float | None:
        return self._deadline
