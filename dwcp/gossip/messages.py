"""Gossip messages (SWIM probe, ack, indirect probe, nack, gossip, push-pull) and their byte codec.

A membership update is a plain tuple ``(state, name, incarnation, origin)``: the simulator
moves millions of them, so they stay tuples, and ``update_size`` is exact for the codec
below, which lets the simulator account bytes per second without encoding anything.
Names are ASCII (the node config's name rule), at most 64 bytes.

Why a hand-written codec: six fixed fields and a list of updates; ``struct`` keeps it
bounded (every length is checked before it is used) without a schema dependency.
"""

from __future__ import annotations

import struct

from dwcp.errors import ProtocolError

ALIVE, SUSPECT, DEAD, LEFT = 0, 1, 2, 3
STATE_NAMES = ("alive", "suspect", "dead", "left")

PING, ACK, PING_REQ, NACK, GOSSIP, PUSH, PULL = 1, 2, 3, 4, 5, 6, 7
KIND_NAMES = {
    PING: "ping",
    ACK: "ack",
    PING_REQ: "ping-req",
    NACK: "nack",
    GOSSIP: "gossip",
    PUSH: "push",  # anti-entropy: a chunk of the sender's member table (dwcp.gossip.pushpull)
    PULL: "pull",  # the receiver's table sent back
}

MAX_NAME = 64
MAX_UPDATES = 255
MAGIC = b"DG"
VERSION = 1
_HEAD = struct.Struct("!2sBBQ")  # magic, version, kind, seq
_UPD = struct.Struct("!BQ")  # state, incarnation
HEADER_BYTES = _HEAD.size + 1 + 1  # + target length + update count (target bytes extra)

Update = tuple[int, str, int, str]


def update_size(u: Update) -> int:
    """Encoded bytes of one update."""
    return _UPD.size + 2 + len(u[1]) + len(u[3])


class Message:
    """One gossip message: ``kind``, sequence number, probe target and piggybacked updates."""

    __slots__ = ("kind", "seq", "target", "updates")

    def __init__(self, kind: int, seq: int, target: str, updates: list[Update]) -> None:
        self.kind = kind
        self.seq = seq
        self.target = target
        self.updates = updates

    def size(self) -> int:
        return HEADER_BYTES + len(self.target) + sum(update_size(u) for u in self.updates)

    def __repr__(self) -> str:
        kind = KIND_NAMES.get(self.kind, self.kind)
        return f"Message({kind}, {self.seq}, {self.target!r}, {self.updates!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and (
            (self.kind, self.seq, self.target, self.updates)
            == (other.kind, other.seq, other.target, other.updates)
        )

    __hash__ = None  # type: ignore[assignment]


def _name(b: bytes, at: int) -> tuple[str, int]:
    if at >= len(b):
        raise ProtocolError("gossip message truncated in a name")
    n = b[at]
    end = at + 1 + n
    if n > MAX_NAME or end > len(b):
        raise ProtocolError(f"gossip message: name of {n} bytes does not fit")
    try:
        return b[at + 1 : end].decode("ascii"), end
    except UnicodeDecodeError as exc:
        raise ProtocolError("gossip message: a name is not ASCII") from exc


def _put_name(out: bytearray, s: str) -> None:
    try:
        raw = s.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"name {s[:70]!r} is not ASCII") from exc
    if len(raw) > MAX_NAME:
        raise ProtocolError(f"name {s[:70]!r} is longer than {MAX_NAME} bytes")
    out.append(len(raw))
    out += raw


def encode(m: Message) -> bytes:
    """Encode ``m``; raise ``ProtocolError`` for a name that is not ASCII or too long."""
    if len(m.updates) > MAX_UPDATES:
        raise ProtocolError(f"at most {MAX_UPDATES} updates per message")
    out = bytearray(_HEAD.pack(MAGIC, VERSION, m.kind, m.seq))
    _put_name(out, m.target)
    out.append(len(m.updates))
    for state, name, inc, origin in m.updates:
        out += _UPD.pack(state, inc)
        _put_name(out, name)
        _put_name(out, origin)
    return bytes(out)


def decode(b: bytes) -> Message:
    """Decode one message; raise ``ProtocolError`` for anything malformed (never more)."""
    if len(b) < _HEAD.size + 2:
        raise ProtocolError(f"gossip message of {len(b)} bytes is too short")
    magic, version, kind, seq = _HEAD.unpack_from(b, 0)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a gossip v{VERSION} message (magic {magic!r}, version {version})")
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown gossip message kind {kind}")
    target, at = _name(b, _HEAD.size)
    if at >= len(b):
        raise ProtocolError("gossip message truncated before its updates")
    count = b[at]
    at += 1
    updates: list[Update] = []
    for _ in range(count):
        if at + _UPD.size > len(b):
            raise ProtocolError("gossip message truncated in an update")
        state, inc = _UPD.unpack_from(b, at)
        if state > LEFT:
            raise ProtocolError(f"unknown member state {state}")
        name, at = _name(b, at + _UPD.size)
        origin, at = _name(b, at)
        updates.append((state, name, inc, origin))
    if at != len(b):
        raise ProtocolError(f"gossip message has {len(b) - at} trailing bytes")
    return Message(kind, seq, target, updates)
