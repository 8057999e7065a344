"""The replicated VM ownership registry: ``vm -> (owner node, epoch)``.

A migration is a compare-and-set on the epoch, so two concurrent MIGRATEs of one
VM cannot both succeed: the epoch is the fencing token storage can check. Ops and
results are canonical msgpack so every replica returns byte-equal results.

Ops (``encode_op`` builds them):
- ``["register", vm, owner]``: a new VM at epoch 1 (fails if it exists)
- ``["migrate", vm, from, to, expected_epoch]``: owner ``from`` -> ``to`` if the
  epoch is still ``expected_epoch``; the epoch becomes ``expected_epoch + 1``
- ``["release", vm, owner]``: remove the VM (only by its owner)
- ``["get", vm]``: read ``(owner, epoch)``
- ``["add_node", name, key, address]``, ``["remove_node", name]``, ``["members"]``: the
  fleet's member table (``dwcp.consensus.members``; any member client may change it)

Results: ``["ok", owner, epoch]`` or ``["err", reason, owner, epoch]`` (owner ""
and epoch 0 when the VM is unknown).

Access control (``VMRegistry(check_owner=True)``, what node clusters run): owners
are node ids (``dwcp.identity.node_id_of`` of the key that signed the request), and
a client may only register a VM to itself, migrate a VM away from itself and release
its own VMs (reason ``"forbidden"`` otherwise). Without it any member client may act
for any owner name, which suits the simulator's symbolic owners. Every replica of a
cluster must use the same setting (it is in the cluster file).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from dwcp.consensus.members import OPS as MEMBER_OPS
from dwcp.consensus.members import MemberTable
from dwcp.errors import ProtocolError
from dwcp.identity import node_id_of

MAX_NAME = 256
_MAX_OP = 4096


def encode_op(*items: str | int) -> bytes:
    """Encode a registry operation, e.g. ``encode_op("migrate", "vm1", "a", "b", 3)``."""
    return msgpack.packb(list(items), use_bin_type=True)


@dataclass(frozen=True, slots=True)
class Result:
    ok: bool
    reason: str
    owner: str
    epoch: int


def decode_result(data: bytes) -> Result:
    """Parse a registry result (raise ``ProtocolError`` if it is not one)."""
    try:
        items = msgpack.unpackb(data, use_list=False, raw=False, max_array_len=8)
    except Exception as exc:
        raise ProtocolError(f"not a registry result: {type(exc).__name__}") from exc
    if type(items) is tuple and len(items) == 3 and items[0] == "ok":
        return Result(True, "", str(items[1]), int(items[2]))
    if type(items) is tuple and len(items) == 4 and items[0] == "err":
        return Result(False, str(items[1]), str(items[2]), int(items[3]))
    raise ProtocolError("not a registry result")


def _name(x: Any) -> bool:
    return type(x) is str and 0 < len(x) <= MAX_NAME


def _epoch(x: Any) -> bool:
    return type(x) is int and 0 <= x < 1 << 62


class VMRegistry:
    """Deterministic state machine mapping each VM to its single owner and epoch."""

    def __init__(self, *, check_owner: bool = False) -> None:
        self._vms: dict[str, tuple[str, int]] = {}
        self.check_owner = check_owner
        self.members = MemberTable()

    def _forbidden(self, owner: str, client: bytes) -> bool:
        return self.check_owner and owner != node_id_of(client)

    def _ok(self, vm: str) -> bytes:
        owner, epoch = self._vms[vm]
        return msgpack.packb(["ok", owner, epoch], use_bin_type=True)

    def _err(self, reason: str, vm: str | None = None) -> bytes:
        owner, epoch = self._vms.get(vm, ("", 0)) if vm is not None else ("", 0)
        return msgpack.packb(["err", reason, owner, epoch], use_bin_type=True)

    def execute(self, op: bytes, client: bytes = b"") -> bytes:
        """Apply one operation for ``client`` (raw public key); malformed ops are answered
        with an error, never raised."""
        if len(op) > _MAX_OP:
            return self._err("malformed")
        try:
            items = msgpack.unpackb(op, use_list=False, raw=False, max_array_len=8)
        except Exception:
            return self._err("malformed")
        if type(items) is not tuple or not items or type(items[0]) is not str:
            return self._err("malformed")
        name, args = items[0], items[1:]
        if name in MEMBER_OPS:
            answer = self.members.execute(name, args)
            return self._err("malformed") if answer is None else answer
        if name == "register" and len(args) == 2 and all(map(_name, args)):
            vm, owner = args
            if vm in self._vms:
                return self._err("exists", vm)
            if self._forbidden(owner, client):
                return self._err("forbidden", vm)
            self._vms[vm] = (owner, 1)
            return self._ok(vm)
        if name == "migrate" and len(args) == 4 and all(map(_name, args[:3])) and _epoch(args[3]):
            vm, src, dst, expected = args
            if vm not in self._vms:
                return self._err("unknown", vm)
            owner, epoch = self._vms[vm]
            if epoch != expected:
                return self._err("stale-epoch", vm)
            if owner != src:
                return self._err("not-owner", vm)
            if self._forbidden(src, client):
                return self._err("forbidden", vm)
            self._vms[vm] = (dst, epoch + 1)
            return self._ok(vm)
        if name == "release" and len(args) == 2 and all(map(_name, args)):
            vm, owner = args
            if vm not in self._vms:
                return self._err("unknown", vm)
            if self._vms[vm][0] != owner:
                return self._err("not-owner", vm)
            if self._forbidden(owner, client):
                return self._err("forbidden", vm)
            result = self._ok(vm)
            del self._vms[vm]
            return result
        if name == "get" and len(args) == 1 and _name(args[0]):
            vm = args[0]
            return self._ok(vm) if vm in self._vms else self._err("unknown", vm)
        return self._err("malformed")

    def lookup(self, vm: str) -> tuple[str, int] | None:
        """Local (unreplicated) read, for tests and checkers."""
        return self._vms.get(vm)

    def items(self) -> list[tuple[str, str, int]]:
        return [(vm, o, e) for vm, (o, e) in sorted(self._vms.items())]

    def snapshot(self) -> bytes:
        """Canonical state: the VM rows alone while the member table was never touched (the
        format before member ops, so old checkpoints keep their digests), else a map."""
        vms = [[vm, o, e] for vm, (o, e) in sorted(self._vms.items())]
        if self.members.empty():
            return msgpack.packb(vms, use_bin_type=True)
        doc = {"vms": vms, "members_version": self.members.version, "members": self.members.rows()}
        return msgpack.packb(doc, use_bin_type=True)

    def restore(self, data: bytes) -> None:
        try:
            rows = msgpack.unpackb(data, use_list=False, raw=False)
        except Exception as exc:
            raise ProtocolError(f"registry snapshot undecodable: {type(exc).__name__}") from exc
        vms: dict[str, tuple[str, int]] = {}
        members = MemberTable()
        if type(rows) is dict:
            if set(rows) != {"vms", "members_version", "members"}:
                raise ProtocolError("registry snapshot map has unexpected keys")
            members.restore(rows["members_version"], rows["members"])
            rows = rows["vms"]
        if type(rows) is not tuple:
            raise ProtocolError("registry snapshot must be a list")
        for row in rows:
            if not (
                type(row) is tuple
                and len(row) == 3
                and _name(row[0])
                and _name(row[1])
                and _epoch(row[2])
            ):
                raise ProtocolError("registry snapshot row is malformed")
            vms[row[0]] = (row[1], row[2])
        self._vms = vms
        self.members = members

    def digest(self) -> bytes:
        return hashlib.blake2b(self.snapshot(), digest_size=32).digest()
