"""Every ASS datagram signed by its sender's node key; forgeries and replays dropped.

Envelope: ``b"DGE1" | sender name (u8 length + ASCII) | counter u64 | body | Ed25519
signature`` over a domain tag and everything before the signature. The counter starts at
the sender's wall clock in nanoseconds and grows by one per datagram, so it keeps growing
across restarts; a receiver keeps, per sender, the highest counter seen and a 64-wide
window below it (as IPsec does), which admits reordering and refuses every replay.

Why Ed25519 per datagram rather than a session key: the node keys already exist, a
datagram protocol has no handshake to derive one from, and at one probe per second
verification (~60 us) is far below the budget.
"""

from __future__ import annotations

import struct
import time

from dwcp.errors import AuthenticationError, ProtocolError
from dwcp.identity import SIGNATURE_BYTES, NodeKey, PublicKey

MAGIC = b"DGE1"
DOMAIN = b"dwcp-gossip-v1\x00"
WINDOW = 64
_COUNTER = struct.Struct("!Q")
MAX_DATAGRAM = 64 * 1024


class Signer:
    """Seals outgoing bodies with this node's key and a growing counter."""

    def __init__(self, key: NodeKey, name: str) -> None:
        self.key = key
        raw = name.encode("ascii")
        self._head = MAGIC + bytes([len(raw)]) + raw
        self.counter = time.time_ns()

    def seal(self, body: bytes) -> bytes:
        self.counter += 1
        signed = self._head + _COUNTER.pack(self.counter) + body
        return signed + self.key.sign(DOMAIN + signed)


class Verifier:
    """Opens datagrams from admitted members only; ``dropped`` counts the rest by reason."""

    def __init__(self, keys: dict[str, PublicKey]) -> None:
        self.keys = dict(keys)
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (highest counter, bitmap)
        self.dropped: dict[str, int] = {"malformed": 0, "not_admitted": 0, "forged": 0, "replay": 0}

    def set_keys(self, keys: dict[str, PublicKey]) -> None:
        self.keys = dict(keys)

    def open(self, datagram: bytes) -> tuple[str, bytes]:
        """Return (sender, body); raise ``ProtocolError``/``AuthenticationError`` (and count it)."""
        try:
            if len(datagram) > MAX_DATAGRAM or datagram[:4] != MAGIC or len(datagram) < 6:
                raise ProtocolError("not a gossip datagram")
            n = datagram[4]
            end = 5 + n
            if len(datagram) < end + _COUNTER.size + SIGNATURE_BYTES:
                raise ProtocolError("gossip datagram truncated")
            name = datagram[5:end].decode("ascii")
        except (ProtocolError, UnicodeDecodeError) as exc:
            self.dropped["malformed"] += 1
            raise ProtocolError(f"malformed gossip datagram: {exc}") from exc
        key = self.keys.get(name)
        if key is None:
            self.dropped["not_admitted"] += 1
            raise AuthenticationError(f"gossip from {name!r}, which is not an admitted member")
        signed, sig = datagram[:-SIGNATURE_BYTES], datagram[-SIGNATURE_BYTES:]
        try:
            key.verify(DOMAIN + signed, sig)
        except AuthenticationError:
            self.dropped["forged"] += 1
            raise
        (counter,) = _COUNTER.unpack_from(signed, end)
        if not self._fresh(name, counter):
            self.dropped["replay"] += 1
            raise AuthenticationError(f"replayed gossip datagram from {name!r}")
        return name, signed[end + _COUNTER.size :]

    def _fresh(self, name: str, counter: int) -> bool:
        top, bits = self._seen.get(name, (0, 0))
        if counter > top:
            shift = counter - top
            bits = ((bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self._seen[name] = (counter, bits)
            return True
        age = top - counter
        if age >= WINDOW or bits >> age & 1:
            return False
        self._seen[name] = (top, bits | 1 << age)
        return True
