"""Who is admitted to the ASS fleet: names, Ed25519 keys and gossip (UDP) addresses.

Admission is authoritative, liveness is gossiped: only an admitted member is probed,
believed or answered. ``gossip.toml`` next to the node's ``node.toml`` is the bootstrap
set (the same on every member, and it names this node); with ``[consensus]`` the PBFT
registry's member table (``dwcp.consensus.members``, changed by ``dwcp cluster add-node``
/ ``remove-node`` from any member) is a committed delta over it: an add admits a node
everywhere, a remove drops it everywhere, bootstrap members included.
``AdmissionWatcher`` re-reads that table at start and every ``admission_poll`` seconds
(each read has the ``[consensus] timeout`` deadline; an unreachable cluster keeps the
set in force), and at once after this node committed a change.

    listen = "127.0.0.1:7601"      # this node's gossip address (UDP)
    period = 1.0                   # probe period (s), optional
    admission_poll = 5.0           # seconds between reads of the registry, optional
    [[members]]                    # the bootstrap members, this node included
    name = "a"
    key = "ed25519:..."
    address = "127.0.0.1:7601"
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dwcp.consensus.members import MemberSet
from dwcp.errors import ConfigError, ConsensusError, KeyFileError, UsageError
from dwcp.identity import PublicKey
from dwcp.node.config import NAME_RE, Address, parse_address
from dwcp.node.ownership import Ownership

log = logging.getLogger("dwcp.node")

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
    poll: float = 5.0  # seconds between reads of the registry's member table

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
    unknown = set(doc) - {"listen", "period", "admission_poll", "members"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown keys {sorted(unknown)}; expected listen, period, "
            "admission_poll, members"
        )
    try:
        listen = parse_address(str(doc["listen"]), default_port=None)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f'{path}: listen: expected "HOST:PORT" for gossip (UDP)') from exc
    period = doc.get("period", 1.0)
    if not isinstance(period, int | float) or not 0.05 <= period <= 60:
        raise ConfigError(f"{path}: period: expected seconds between 0.05 and 60, got {period!r}")
    poll = doc.get("admission_poll", 5.0)
    if not isinstance(poll, int | float) or not 0.1 <= poll <= 3600:
        raise ConfigError(
            f"{path}: admission_poll: expected seconds between 0.1 and 3600, got {poll!r}"
        )
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
    return Admission(listen, float(period), tuple(members), float(poll))


def effective(bootstrap: tuple[AdmittedMember, ...], table: MemberSet) -> list[AdmittedMember]:
    """The admitted members: the bootstrap set, minus what the table removed, with what it
    admitted (an entry of the table replaces a bootstrap member of the same name)."""
    out = {m.name: m for m in bootstrap if m.name not in table.removed}
    for name, key, address in table.admitted:
        out[name] = AdmittedMember(
            name, PublicKey.parse(key), parse_address(address, default_port=None)
        )
    committed = {PublicKey.parse(key).raw: name for name, key, _ in table.admitted}
    for m in list(out.values()):  # a bootstrap member whose key a committed entry took
        if committed.get(m.key.raw, m.name) != m.name:
            del out[m.name]
    return [out[n] for n in sorted(out)]


class AdmissionWatcher:
    """Keeps the gossip service's member set equal to the committed one (see the module)."""

    def __init__(
        self,
        ownership: Ownership,
        bootstrap: tuple[AdmittedMember, ...],
        poll: float,
        apply: Callable[[list[AdmittedMember], int], None],
    ) -> None:
        self.ownership = ownership
        self.bootstrap = bootstrap
        self.poll = poll
        self.apply = apply
        self.version = 0  # 0: the bootstrap set is in force
        self.failures = 0
        self._wake = asyncio.Event()

    def nudge(self) -> None:
        """This node committed a change: read the table now, not at the next poll."""
        self._wake.set()

    async def refresh(self) -> bool:
        """Read the table once; apply it if newer. False if the cluster did not answer."""
        try:
            table = await self.ownership.member_set()
        except ConsensusError as exc:
            self.failures += 1
            if self.failures in (1, 10) or self.failures % 100 == 0:
                log.warning(
                    "gossip: cannot read the member table (%s); the admitted set stays as "
                    "it is (version %d)",
                    exc,
                    self.version,
                    extra={"event": "admission_unreachable"},
                )
            return False
        self.failures = 0
        if table.version > self.version:
            self.version = table.version
            self.apply(effective(self.bootstrap, table), table.version)
        return True

    async def run(self) -> None:
        while True:
            self._wake.clear()  # before the read: a nudge during it triggers the next one
            await self.refresh()
            try:
                async with asyncio.timeout(self.poll):
                    await self._wake.wait()
            except TimeoutError:
                pass


async def add_node(
    ownership: Ownership, admitted: dict[str, AdmittedMember], name: str, key: str, address: str
) -> dict[str, object]:
    """``dwcp cluster add-node``: check locally, then commit through PBFT."""
    if not NAME_RE.match(name):
        raise UsageError(f"name {name!r}: letters, digits, '.', '_', '-' (<= 64)")
    try:
        pub = PublicKey.parse(key)
        addr = parse_address(address, default_port=None)
    except (KeyFileError, ValueError) as exc:
        raise UsageError(f"{exc} (expected NAME PUBKEY HOST:PORT, the gossip UDP address)") from exc
    if name in admitted:
        raise UsageError(
            f"{name} is already a member; remove it first to change its key or address"
        )
    other = next((m.name for m in admitted.values() if m.key == pub), None)
    if other is not None:
        raise UsageError(f"that key is already member {other}'s")
    got = await ownership.change_members("add_node", name, pub.text, str(addr))
    if not got.ok:
        raise ConsensusError(
            f"the cluster refused to add {name}: {_REASONS.get(got.reason, got.reason)}"
        )
    log.info(
        "admitted %s (%s) to the fleet, member table version %d",
        name,
        addr,
        got.epoch,
        extra={"event": "member_added", "member": name, "version": got.epoch},
    )
    return {"name": name, "key": pub.text, "address": str(addr), "version": got.epoch}


async def remove_node(
    ownership: Ownership, admitted: dict[str, AdmittedMember], name: str
) -> dict[str, object]:
    """``dwcp cluster remove-node``: the name must be a member (here or in the table)."""
    table = await ownership.member_set()
    if name not in admitted and name not in {r[0] for r in table.admitted}:
        raise UsageError(
            f"{name} is not an admitted member (see 'dwcp members'; a member known only from "
            "another node's gossip.toml is removed from a node that gossips)"
        )
    got = await ownership.change_members("remove_node", name)
    if not got.ok:
        raise ConsensusError(
            f"the cluster refused to remove {name}: {_REASONS.get(got.reason, got.reason)}"
        )
    log.info(
        "removed %s from the fleet, member table version %d",
        name,
        got.epoch,
        extra={"event": "member_removed", "member": name, "version": got.epoch},
    )
    return {"name": name, "version": got.epoch}


_REASONS = {
    "exists": "the name is admitted already (remove it first)",
    "key-in-use": "another admitted member has that key",
    "removed": "it was removed already",
    "full": "the member table is full (10,000 entries)",
    "bad-name": "invalid name",
    "bad-key": "invalid key (expected ed25519:<base64>)",
    "bad-address": "invalid address (expected HOST:PORT)",
    "forbidden": "this node may not change the member table",
}
