"""Who is admitted to the ASS fleet: names, Ed25519 keys and gossip (UDP) addresses.

Admission is authoritative, liveness is gossiped: only a member listed here is probed,
believed or answered. Until the PBFT registry carries ADD_NODE/REMOVE_NODE, the list is
``gossip.toml`` next to the node's ``node.toml``; ``load_admission`` is the one place
that changes when it moves to the registry.

    listen = "127.0.0.1:7601"      # this node's gossip address (UDP)
    period = 1.0                   # probe period (s), optional
    [[members]]                    # every member, this node included
    name = "a"
    key = "ed25519:..."
    address = "127.0.0.1:7601"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from dwcp.errors import ConfigError, KeyFileError
from dwcp.identity import PublicKey
from dwcp.node.config import NAME_RE, Address, parse_address

FILE_NAME = "gossip.toml"


@dataclass(frozen=True)
class AdmittedMember:
    name: str
    key: PublicKey
    address: Address


@dataclass(frozen=True)
class Admission:
    listen: Address
    period: float
    members: tuple[AdmittedMember, ...]

    def by_name(self) -> dict[str, AdmittedMember]:
        return {m.name: m for m in self.members}

    def name_of(self, key: PublicKey) -> str | None:
        return next((m.name for m in self.members if m.key == key), None)


def admission_path(node_config_path: Path) -> Path:
    return node_config_path.parent / FILE_NAME


def load_admission(node_config_path: Path) -> Admission | None:
    """The admitted members, or None when this node has no ``gossip.toml`` (gossip is off)."""
    path = admission_path(node_config_path)
    if not path.exists():
        return None
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    unknown = set(doc) - {"listen", "period", "members"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown keys {sorted(unknown)}; expected listen, period, members"
        )
    try:
        listen = parse_address(str(doc["listen"]), default_port=None)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f'{path}: listen: expected "HOST:PORT" for gossip (UDP)') from exc
    period = doc.get("period", 1.0)
    if not isinstance(period, int | float) or not 0.05 <= period <= 60:
        raise ConfigError(f"{path}: period: expected seconds between 0.05 and 60, got {period!r}")
    raw = doc.get("members", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: members: expected [[members]] tables")
    members: list[AdmittedMember] = []
    for i, t in enumerate(raw):
        where = f"{path}: members[{i}]"
        if not isinstance(t, dict) or set(t) != {"name", "key", "address"}:
            raise ConfigError(f"{where}: expected a table with name, key and address")
        name = str(t["name"])
        if not NAME_RE.match(name):
            raise ConfigError(f"{where}: name {name!r}: letters, digits, '.', '_', '-' (<= 64)")
        try:
            key = PublicKey.parse(str(t["key"]))
            address = parse_address(str(t["address"]), default_port=None)
        except (KeyFileError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        members.append(AdmittedMember(name, key, address))
    if len({m.name for m in members}) != len(members):
        raise ConfigError(f"{path}: two members share a name")
    if len({m.key.raw for m in members}) != len(members):
        raise ConfigError(f"{path}: two members share a key")
    return Admission(listen, float(period), tuple(members))
