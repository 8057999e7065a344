"""The fleet's member table, replicated in the PBFT registry (ASS admission, issue 13).

Admission is authoritative, liveness is gossiped: who may gossip is what this table
committed, so an operator admits or removes a node with one command from any member
(``dwcp cluster add-node`` / ``remove-node``) instead of editing every ``gossip.toml``.

The table is a committed *delta* over each node's ``gossip.toml`` (the bootstrap set,
identical on every member): an entry is either admitted (name, Ed25519 key, gossip UDP
``HOST:PORT``) or removed (a tombstone, so a bootstrap member can be removed too). The
version rises by one on every committed change, so a node polling ``members`` applies a
set only when it is newer than the one it has.

Ops (``encode_op`` of ``dwcp.consensus.registry``):
- ``["add_node", name, key, address]``: admit ``name`` (or re-admit a removed one).
  Result ``["ok", name, version]``; errors ``exists`` (name admitted), ``key-in-use``
  (another admitted entry has the key), ``bad-name``, ``bad-key``, ``bad-address``, ``full``.
- ``["remove_node", name]``: remove ``name`` (a tombstone). Errors ``removed`` (already).
- ``["members"]``: ``["members", version, [[name, key, address]...], [removed...]]``.

Validation is pure (no files, no DNS): every replica must reach the same verdict.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

import msgpack

from dwcp.errors import ProtocolError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # as dwcp.node.config's NAME_RE
HOST_RE = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
KEY_PREFIX = "ed25519:"
MAX_ENTRIES = 10_000  # admitted + removed: bounds the snapshot and the members answer
OPS = frozenset({"add_node", "remove_node", "members"})


def check_name(name: Any) -> str | None:
    """The reason ``name`` is refused, or None."""
    return None if type(name) is str and NAME_RE.match(name) else "bad-name"


def canonical_key(text: Any) -> str | None:
    """``ed25519:<base64 of 32 bytes>`` in its one canonical spelling, or None."""
    if type(text) is not str or not text.startswith(KEY_PREFIX) or len(text) > 100:
        return None
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32:
        return None
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def canonical_address(text: Any) -> str | None:
    """``HOST:PORT`` (``[v6]:PORT``), port 1-65535, or None."""
    if type(text) is not str or len(text) > 300:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            return None
        port = rest[1:]
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            return None
    if not HOST_RE.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


@dataclass(frozen=True, slots=True)
class MemberSet:
    """A committed member table: what ``["members"]`` answers."""

    version: int
    admitted: tuple[tuple[str, str, str], ...]  # (name, key text, address), by name
    removed: tuple[str, ...]


def decode_members(data: bytes) -> MemberSet:
    """Parse a ``members`` answer (raise ``ProtocolError`` if it is not one)."""
    try:
        items = msgpack.unpackb(data, use_list=False, raw=False, max_array_len=MAX_ENTRIES)
    except Exception as exc:
        raise ProtocolError(f"not a members answer: {type(exc).__name__}") from exc
    if not (type(items) is tuple and len(items) == 4 and items[0] == "members"):
        raise ProtocolError("not a members answer")
    _, version, admitted, removed = items
    if type(version) is not int or type(admitted) is not tuple or type(removed) is not tuple:
        raise ProtocolError("members answer is malformed")
    rows: list[tuple[str, str, str]] = []
    for row in admitted:
        if not (type(row) is tuple and len(row) == 3 and all(type(x) is str for x in row)):
            raise ProtocolError("members answer row is malformed")
        rows.append((row[0], row[1], row[2]))
    if not all(type(x) is str for x in removed):
        raise ProtocolError("members answer is malformed")
    return MemberSet(version, tuple(rows), tuple(removed))


class MemberTable:
    """Deterministic member state: ``name -> (key, address)`` or a tombstone (``None``)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, str] | None] = {}
        self.version = 0

    def _answer(self, ok: bool, reason: str, name: str) -> bytes:
        if ok:
            return msgpack.packb(["ok", name, self.version], use_bin_type=True)
        return msgpack.packb(["err", reason, name, self.version], use_bin_type=True)

    def execute(self, name: str, args: tuple[Any, ...]) -> bytes | None:
        """Apply one member op; None when the op is malformed (the registry answers that)."""
        if name == "members" and not args:
            return self.members()
        if name == "add_node" and len(args) == 3:
            node, key_text, addr_text = args
            if bad := check_name(node):
                return self._answer(False, bad, "")
            key = canonical_key(key_text)
            if key is None:
                return self._answer(False, "bad-key", node)
            address = canonical_address(addr_text)
            if address is None:
                return self._answer(False, "bad-address", node)
            if self.entries.get(node) is not None:
                return self._answer(False, "exists", node)
            if any(e is not None and e[0] == key for e in self.entries.values()):
                return self._answer(False, "key-in-use", node)
            if node not in self.entries and len(self.entries) >= MAX_ENTRIES:
                return self._answer(False, "full", node)
            self.entries[node] = (key, address)
            self.version += 1
            return self._answer(True, "", node)
        if name == "remove_node" and len(args) == 1:
            (node,) = args
            if bad := check_name(node):
                return self._answer(False, bad, "")
            if node in self.entries and self.entries[node] is None:
                return self._answer(False, "removed", node)
            if node not in self.entries and len(self.entries) >= MAX_ENTRIES:
                return self._answer(False, "full", node)
            self.entries[node] = None
            self.version += 1
            return self._answer(True, "", node)
        return None

    def members(self) -> bytes:
        admitted = [[n, *e] for n, e in sorted(self.entries.items()) if e is not None]
        removed = [n for n, e in sorted(self.entries.items()) if e is None]
        return msgpack.packb(["members", self.version, admitted, removed], use_bin_type=True)

    def empty(self) -> bool:
        return self.version == 0 and not self.entries

    def rows(self) -> list[list[Any]]:
        """Canonical snapshot rows: ``[name, key, address]`` or ``[name]`` (removed)."""
        return [[n, *e] if e is not None else [n] for n, e in sorted(self.entries.items())]

    def restore(self, version: Any, rows: Any) -> None:
        if type(version) is not int or version < 0 or type(rows) is not tuple:
            raise ProtocolError("registry snapshot: member table is malformed")
        entries: dict[str, tuple[str, str] | None] = {}
        for row in rows:
            if type(row) is not tuple or len(row) not in (1, 3) or check_name(row[0]):
                raise ProtocolError("registry snapshot: member row is malformed")
            if len(row) == 1:
                entries[row[0]] = None
                continue
            key, address = canonical_key(row[1]), canonical_address(row[2])
            if key is None or address is None:
                raise ProtocolError("registry snapshot: member row is malformed")
            entries[row[0]] = (key, address)
        self.entries, self.version = entries, version
