"""Sans-IO admission of new QUIC connections: which Initials a server answers, and how.

A ClientHello costs the server a key exchange, a signature and ~100 KB of
connection state before it learns who the client is, so an unbounded stream
of them (3,000 in 7 s raised a node's RSS from 72 to 346 MB and slowed a
concurrent transfer 20x) must be bounded before the handshake:

- Above ``retry_above`` pending handshakes, a client must first prove its
  address with a QUIC Retry (a stateless round trip: the server keeps nothing
  until the client echoes the token), so spoofed floods cost one packet each
  and hold at most ``retry_above`` connections.
- At most ``max_pending`` connections are pending (handshaking, or waiting
  for their Hello) at once; of those whose address is proven, at most
  ``per_address`` from one IP address, and one address may start at most
  ``rate_per_address`` handshakes per second (a bucket of ``per_address``
  tokens). Unproven addresses are not counted per address: a spoofer must not
  be able to lock a victim's address out.
- Once a peer has proven its key and joined a session, at most ``per_key``
  connections and ``sessions_per_key`` sessions per key.

``Admission`` is fed the facts (``admit(ip, validated, now)``, then a ticket
per connection through ``open`` / ``join`` / ``release``) and answers; it has
no sockets or clocks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

from dwcp.identity import PublicKey

K = TypeVar("K")


class Verdict(enum.Enum):
    ACCEPT = "accept"  # start the handshake
    RETRY = "retry"  # answer with a Retry: the client must prove its address first
    DROP = "drop"  # ignore the packet (over a cap)


@dataclass(frozen=True)
class AdmissionLimits:
    retry_above: int = 16
    max_pending: int = 128
    per_address: int = 8
    rate_per_address: float = 20.0
    per_key: int = 128
    sessions_per_key: int = 64


@dataclass
class AdmissionStats:
    """Counters for metrics and tests (cumulative except ``pending`` / ``joined``)."""

    pending: int = 0
    joined: int = 0
    accepted: int = 0
    retries: int = 0
    dropped: int = 0
    refused_keys: int = 0
    most_pending: int = 0


class Ticket:
    """One admitted connection's place in the counts (from ``open`` to ``release``)."""

    __slots__ = ("ip", "key", "session")

    def __init__(self, ip: str | None) -> None:
        self.ip = ip  # None: the address was not proven (not counted per address)
        self.key: PublicKey | None = None  # set once it joined a session
        self.session = False  # it is the first connection of a session


class Admission:
    """The server's handshake budget (see the module docstring)."""

    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self.stats = AdmissionStats()
        self._pending_by_ip: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, at)
        self._conns_by_key: dict[PublicKey, int] = {}
        self._sessions_by_key: dict[PublicKey, int] = {}

    def admit(self, ip: str, validated: bool, now: float) -> Verdict:
        """What to do with an Initial that would start a new connection from ``ip``.

        ``validated``: it carries a valid Retry token (the address is proven).
        """
        lim = self.limits
        st = self.stats
        if st.pending >= lim.max_pending:
            st.dropped += 1
            return Verdict.DROP
        if not validated:
            if st.pending >= lim.retry_above:
                st.retries += 1
                return Verdict.RETRY
        elif self._pending_by_ip.get(ip, 0) >= lim.per_address or not self._take_token(ip, now):
            st.dropped += 1
            return Verdict.DROP
        st.accepted += 1
        return Verdict.ACCEPT

    def _take_token(self, ip: str, now: float) -> bool:
        lim = self.limits
        burst = float(lim.per_address)
        tokens, at = self._buckets.get(ip, (burst, now))
        tokens = min(burst, tokens + (now - at) * lim.rate_per_address)
        if tokens < 1.0:
            self._buckets[ip] = (tokens, now)
            return False
        self._buckets[ip] = (tokens - 1.0, now)
        if len(self._buckets) > 4 * lim.max_pending:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        """Forget addresses whose bucket has refilled (they are as good as new)."""
        lim = self.limits
        full = float(lim.per_address)
        self._buckets = {
            ip: (t, at)
            for ip, (t, at) in self._buckets.items()
            if t + (now - at) * lim.rate_per_address < full
        }

    def open(self, ip: str, validated: bool) -> Ticket:
        """An accepted Initial became a connection: it is pending until it joins a session."""
        st = self.stats
        st.pending += 1
        st.most_pending = max(st.most_pending, st.pending)
        if not validated:
            return Ticket(None)
        self._pending_by_ip[ip] = self._pending_by_ip.get(ip, 0) + 1
        return Ticket(ip)

    def join(self, ticket: Ticket, key: PublicKey, *, new_session: bool) -> bool:
        """The connection proved ``key`` and said Hello; False if that key is over its limits.

        On False the connection stays pending; close it (``release`` follows).
        """
        lim = self.limits
        if self._conns_by_key.get(key, 0) >= lim.per_key or (
            new_session and self._sessions_by_key.get(key, 0) >= lim.sessions_per_key
        ):
            self.stats.refused_keys += 1
            return False
        self._unpend(ticket.ip)
        ticket.key = key
        ticket.session = new_session
        self._conns_by_key[key] = self._conns_by_key.get(key, 0) + 1
        if new_session:
            self._sessions_by_key[key] = self._sessions_by_key.get(key, 0) + 1
        self.stats.joined += 1
        return True

    def release(self, ticket: Ticket) -> None:
        """The connection is gone (call once per ticket)."""
        key = ticket.key
        if key is None:
            self._unpend(ticket.ip)
            return
        self.stats.joined -= 1
        _decrement(self._conns_by_key, key)
        if ticket.session:
            _decrement(self._sessions_by_key, key)

    def _unpend(self, ip: str | None) -> None:
        self.stats.pending -= 1
        if ip is not None:
            _decrement(self._pending_by_ip, ip)


def _decrement(counts: dict[K, int], key: K) -> None:
    n = counts[key] - 1
    if n:
        counts[key] = n
    else:
        del counts[key]
