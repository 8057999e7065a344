"""The VM ownership registry: compare-and-set migrations, canonical results and snapshots."""

from __future__ import annotations

import pytest

from dwcp.consensus.registry import VMRegistry, decode_result, encode_op
from dwcp.errors import ProtocolError


def _run(reg: VMRegistry, *items: str | int) -> tuple[bool, str, str, int]:
    r = decode_result(reg.execute(encode_op(*items)))
    return r.ok, r.reason, r.owner, r.epoch


def test_register_migrate_release() -> None:
    reg = VMRegistry()
    assert _run(reg, "register", "vm1", "a") == (True, "", "a", 1)
    assert _run(reg, "register", "vm1", "b") == (False, "exists", "a", 1)
    assert _run(reg, "migrate", "vm1", "a", "b", 1) == (True, "", "b", 2)
    assert _run(reg, "get", "vm1") == (True, "", "b", 2)
    assert _run(reg, "release", "vm1", "a") == (False, "not-owner", "b", 2)
    assert _run(reg, "release", "vm1", "b") == (True, "", "b", 2)
    assert _run(reg, "get", "vm1") == (False, "unknown", "", 0)


def test_concurrent_migrations_only_one_wins() -> None:
    reg = VMRegistry()
    _run(reg, "register", "vm", "a")
    to_b = _run(reg, "migrate", "vm", "a", "b", 1)
    to_c = _run(reg, "migrate", "vm", "a", "c", 1)
    assert to_b == (True, "", "b", 2)
    assert to_c == (False, "stale-epoch", "b", 2)
    # A duplicate of the winning MIGRATE does not move the epoch again.
    assert _run(reg, "migrate", "vm", "a", "b", 1) == (False, "stale-epoch", "b", 2)
    # Right epoch but wrong source.
    assert _run(reg, "migrate", "vm", "c", "a", 2) == (False, "not-owner", "b", 2)
    assert reg.lookup("vm") == ("b", 2)


@pytest.mark.parametrize(
    "op",
    [
        b"",
        b"\xc1",
        encode_op("migrate", "vm"),
        encode_op("migrate", "vm", "a", "b", -1),
        encode_op("register", "", "a"),
        encode_op("explode"),
        b"\x92\x01\x02",
        b"x" * 10000,
    ],
)
def test_malformed_ops_are_errors_not_exceptions(op: bytes) -> None:
    reg = VMRegistry()
    _run(reg, "register", "vm", "a")
    before = reg.snapshot()
    r = decode_result(reg.execute(op))
    assert not r.ok
    assert reg.snapshot() == before


def test_results_and_snapshots_are_canonical() -> None:
    a, b = VMRegistry(), VMRegistry()
    for reg, order in ((a, ["x", "y", "z"]), (b, ["z", "x", "y"])):
        for vm in order:
            reg.execute(encode_op("register", vm, "h"))
    assert a.snapshot() == b.snapshot() and a.digest() == b.digest()
    c = VMRegistry()
    c.restore(a.snapshot())
    assert c.items() == a.items()
    assert a.execute(encode_op("get", "x")) == b.execute(encode_op("get", "x"))


def test_restore_rejects_garbage() -> None:
    reg = VMRegistry()
    reg.execute(encode_op("register", "vm", "h"))
    for junk in (b"\xc1", encode_op("a"), b"\x91\x93\x01\x02\x03"):
        with pytest.raises(ProtocolError):
            reg.restore(junk)
    assert reg.lookup("vm") == ("h", 1)


def test_owner_check_lets_a_client_act_only_for_itself() -> None:
    from dwcp.identity import NodeKey

    a, b, mallory = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    reg = VMRegistry(check_owner=True)

    def run(key: NodeKey, *items: str | int) -> tuple[bool, str, str, int]:
        r = decode_result(reg.execute(encode_op(*items), key.public.raw))
        return r.ok, r.reason, r.owner, r.epoch

    assert run(mallory, "register", "vm", a.node_id)[:2] == (False, "forbidden")
    assert run(a, "register", "vm", a.node_id) == (True, "", a.node_id, 1)
    # Mallory knows the owner and the epoch, but cannot move the VM to itself.
    assert run(mallory, "migrate", "vm", a.node_id, mallory.node_id, 1)[:2] == (False, "forbidden")
    assert run(mallory, "release", "vm", a.node_id)[:2] == (False, "forbidden")
    assert run(a, "migrate", "vm", a.node_id, b.node_id, 1) == (True, "", b.node_id, 2)
    assert run(a, "migrate", "vm", a.node_id, b.node_id, 2)[:2] == (False, "not-owner")
    assert run(mallory, "get", "vm") == (True, "", b.node_id, 2)
    assert run(b, "release", "vm", b.node_id)[0]
