"""Signed handshake of the replica network binding (sans-IO): who is on this connection.

Why: before it, the first frame of a connection to a replica was a bare hello naming a
replica id or client keys, believed as is. Anyone who could reach the port could claim a
node's client key and divert (then drop) its replies, wedging that node's ownership
client (issue 19 item 4), or hold 16 MiB frames on many connections (item 5). Now each
side proves its Ed25519 key by signing a transcript holding both sides' fresh nonces, and
a replica keeps no state for a connection (no routing, no large buffers) until the
dialer's keys are proven to be ones the cluster file lists.

Three frames, all in the shared framing (``dwcp.framing``)::

    dialer -> listener   HELLO     b"H1" + dialer nonce (32)
    listener -> dialer   CHALLENGE listener nonce (32) + listener key (32) + signature (64)
    dialer -> listener   PROOF     role (b"R" | b"C") + u16 count + count * (key + signature)

The listener signs ``transcript(b"listener")``; every dialer key signs
``transcript(b"dialer", key)``; the transcript holds the cluster id and both nonces, so
a signature is good for this connection only and never for the other direction. A
replica dials as role ``R`` with its one key; a client pool dials as role ``C`` with
all its clients' keys (one connection carries many clients). The dialer knows which
replica it meant to reach and checks the listener's key is that replica's.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dwcp.consensus.config import ClusterConfig
from dwcp.errors import AuthenticationError, ProtocolError
from dwcp.identity import NodeKey, PublicKey

NONCE = 32
KEY = 32
SIG = 64
_MAGIC = b"H1"
_U16 = struct.Struct(">H")
_CONTEXT = b"dwcp-consensus-handshake-v1\0"
ROLE_REPLICA = b"R"
ROLE_CLIENTS = b"C"


def max_handshake_frame(cluster: ClusterConfig) -> int:
    """The largest frame a handshake may hold: a PROOF naming every configured client."""
    return 1 + _U16.size + (KEY + SIG) * max(len(cluster.clients), 1) + 64


def _transcript(
    cluster: ClusterConfig, dialer_nonce: bytes, listener_nonce: bytes, label: bytes, key: bytes
) -> bytes:
    cid = hashlib.sha256(cluster.cluster_id).digest()
    return _CONTEXT + cid + dialer_nonce + listener_nonce + label + key


@dataclass(frozen=True)
class Peer:
    """Who proved itself on a connection: replica ``replica`` or the clients ``clients``."""

    replica: int | None
    clients: tuple[bytes, ...] = ()


class DialerHandshake:
    """The connecting side: a replica (``keys`` = its key) or a client pool (its clients)."""

    def __init__(
        self,
        cluster: ClusterConfig,
        keys: Sequence[NodeKey],
        role: bytes,
        target: int,
        *,
        nonce: bytes | None = None,
    ) -> None:
        if role not in (ROLE_REPLICA, ROLE_CLIENTS) or not keys:
            raise ValueError("a dialer is a replica with its key or a pool with client keys")
        if role == ROLE_REPLICA and len(keys) != 1:
            raise ValueError("a replica dials with exactly its own key")
        self.cluster = cluster
        self.keys = tuple(keys)
        self.role = role
        self.target = target
        self.nonce = nonce if nonce is not None else os.urandom(NONCE)
        self.done = False

    def hello(self) -> bytes:
        return _MAGIC + self.nonce

    def receive(self, frame: bytes) -> bytes:
        """Check the listener's CHALLENGE; return the PROOF to send (then ``done``).

        Raises ``AuthenticationError`` when the listener is not the replica we dialled.
        """
        if self.done:
            raise ProtocolError("handshake already finished")
        if len(frame) != NONCE + KEY + SIG:
            raise ProtocolError(f"handshake challenge of {len(frame)} bytes")
        lnonce, lkey, sig = frame[:NONCE], frame[NONCE : NONCE + KEY], frame[NONCE + KEY :]
        expected = self.cluster.replicas[self.target]
        if lkey != expected.raw:
            raise AuthenticationError(
                f"the listener at replica {self.target}'s address holds another key; "
                "check the addresses in the cluster file"
            )
        expected.verify(_transcript(self.cluster, self.nonce, lnonce, b"listener", lkey), sig)
        parts = [self.role, _U16.pack(len(self.keys))]
        for k in self.keys:
            raw = k.public.raw
            parts.append(raw)
            parts.append(k.sign(_transcript(self.cluster, self.nonce, lnonce, b"dialer", raw)))
        self.done = True
        return b"".join(parts)


class ListenerHandshake:
    """The accepting side (a replica): answers HELLO, then checks the PROOF."""

    def __init__(self, cluster: ClusterConfig, key: NodeKey, *, nonce: bytes | None = None):
        self.cluster = cluster
        self.key = key
        self.nonce = nonce if nonce is not None else os.urandom(NONCE)
        self._dialer_nonce: bytes | None = None
        self.peer: Peer | None = None
        self._replica_index = {k.raw: i for i, k in enumerate(cluster.replicas)}

    def receive(self, frame: bytes) -> bytes | None:
        """Feed one handshake frame; return a frame to send, or None once ``peer`` is set.

        Raises ``ProtocolError`` (malformed) or ``AuthenticationError`` (a key the cluster
        does not list, or a signature that does not verify): close the connection.
        """
        if self.peer is not None:
            raise ProtocolError("handshake already finished")
        if self._dialer_nonce is None:
            if len(frame) != len(_MAGIC) + NONCE or not frame.startswith(_MAGIC):
                raise ProtocolError("not a dwcp consensus handshake (expected HELLO)")
            self._dialer_nonce = frame[len(_MAGIC) :]
            own = self.key.public.raw
            t = _transcript(self.cluster, self._dialer_nonce, self.nonce, b"listener", own)
            return self.nonce + own + self.key.sign(t)
        self.peer = self._check_proof(frame, self._dialer_nonce)
        return None

    def _check_proof(self, frame: bytes, dnonce: bytes) -> Peer:
        if len(frame) < 1 + _U16.size:
            raise ProtocolError("handshake proof too short")
        role = frame[:1]
        (count,) = _U16.unpack_from(frame, 1)
        body = frame[1 + _U16.size :]
        if count == 0 or len(body) != count * (KEY + SIG):
            raise ProtocolError("handshake proof does not hold its keys")
        if role == ROLE_REPLICA and count != 1:
            raise ProtocolError("a replica proves exactly one key")
        if role not in (ROLE_REPLICA, ROLE_CLIENTS):
            raise ProtocolError(f"unknown handshake role {role!r}")
        keys: list[bytes] = []
        for i in range(count):
            raw = body[i * (KEY + SIG) : i * (KEY + SIG) + KEY]
            sig = body[i * (KEY + SIG) + KEY : (i + 1) * (KEY + SIG)]
            known = (
                raw in self._replica_index
                if role == ROLE_REPLICA
                else self.cluster.client_index(raw) is not None
            )
            if not known:
                raise AuthenticationError("handshake key is not in the cluster file")
            PublicKey(raw).verify(
                _transcript(self.cluster, dnonce, self.nonce, b"dialer", raw), sig
            )
            keys.append(raw)
        if role == ROLE_REPLICA:
            return Peer(self._replica_index[keys[0]])
        return Peer(None, tuple(dict.fromkeys(keys)))
