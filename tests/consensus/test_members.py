"""The fleet's member table in the PBFT registry (issue 13 admission): validation, a monotonic
version, canonical snapshots, and the same table at every replica of a simulated cluster."""

from __future__ import annotations

import random

import pytest
from simcluster import HOSTS, Cluster, Workload

from dwcp.consensus.members import MemberSet, decode_members
from dwcp.consensus.registry import VMRegistry, decode_result, encode_op
from dwcp.errors import ProtocolError
from dwcp.identity import NodeKey

KEY_A = NodeKey(b"a" * 32).public.text
KEY_B = NodeKey(b"b" * 32).public.text


def _run(reg: VMRegistry, *items: str | int) -> tuple[bool, str, str, int]:
    r = decode_result(reg.execute(encode_op(*items)))
    return r.ok, r.reason, r.owner, r.epoch


def _members(reg: VMRegistry) -> MemberSet:
    return decode_members(reg.execute(encode_op("members")))


def test_add_remove_and_readd_raise_the_version() -> None:
    reg = VMRegistry(check_owner=True)
    assert _members(reg) == MemberSet(0, (), ())
    assert _run(reg, "add_node", "n1", KEY_A, "127.0.0.1:7601") == (True, "", "n1", 1)
    assert _run(reg, "add_node", "n1", KEY_B, "127.0.0.1:7602") == (False, "exists", "n1", 1)
    assert _run(reg, "add_node", "n2", KEY_A, "127.0.0.1:7602") == (False, "key-in-use", "n2", 1)
    assert _run(reg, "add_node", "n2", KEY_B, "[::1]:7602") == (True, "", "n2", 2)
    assert _members(reg) == MemberSet(
        2, (("n1", KEY_A, "127.0.0.1:7601"), ("n2", KEY_B, "[::1]:7602")), ()
    )
    assert _run(reg, "remove_node", "n1") == (True, "", "n1", 3)
    assert _run(reg, "remove_node", "n1") == (False, "removed", "n1", 3)
    # a bootstrap member (only in gossip.toml) can be removed: the tombstone says so
    assert _run(reg, "remove_node", "boot") == (True, "", "boot", 4)
    assert _members(reg) == MemberSet(4, (("n2", KEY_B, "[::1]:7602"),), ("boot", "n1"))
    # the removed key is free again; re-admitting a removed name works
    assert _run(reg, "add_node", "n1", KEY_A, "h.example:9") == (True, "", "n1", 5)
    assert _members(reg).removed == ("boot",)
    # member ops do not touch VMs, and VM ops still work beside them
    assert _run(reg, "register", "vm", "x") == (False, "forbidden", "", 0)


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        (("add_node", "-bad", KEY_A, "h:1"), "bad-name"),
        (("add_node", "a" * 65, KEY_A, "h:1"), "bad-name"),
        (("add_node", "n", "ed25519:AAAA", "h:1"), "bad-key"),
        (("add_node", "n", KEY_A[len("ed25519:") :], "h:1"), "bad-key"),
        (("add_node", "n", "/etc/passwd", "h:1"), "bad-key"),
        (("add_node", "n", KEY_A, "h"), "bad-address"),
        (("add_node", "n", KEY_A, "h:0"), "bad-address"),
        (("add_node", "n", KEY_A, "h:65536"), "bad-address"),
        (("add_node", "n", KEY_A, "a b:1"), "bad-address"),
        (("add_node", "n", KEY_A, "::1:7"), "bad-address"),
        (("add_node", "n", KEY_A, "[::1"), "bad-address"),
        (("remove_node", "a/b"), "bad-name"),
        (("add_node", "n", KEY_A), "malformed"),
        (("add_node", "n", KEY_A, 7), "bad-address"),
        (("remove_node",), "malformed"),
        (("members", "x"), "malformed"),
    ],
)
def test_invalid_member_ops_are_refused_and_change_nothing(
    op: tuple[str | int, ...], reason: str
) -> None:
    reg = VMRegistry()
    _run(reg, "add_node", "keep", KEY_B, "127.0.0.1:1")
    before = reg.snapshot()
    ok, got, _, version = _run(reg, *op)
    assert (ok, got, version if reason != "malformed" else 1) == (False, reason, 1)
    assert reg.snapshot() == before


def test_snapshots_are_canonical_and_old_ones_still_restore() -> None:
    plain = VMRegistry()
    plain.execute(encode_op("register", "vm", "h"))
    old = plain.snapshot()
    assert old == b"\x91\x93\xa2vm\xa1h\x01"  # the format before member ops
    a, b = VMRegistry(), VMRegistry()
    for reg, order in ((a, ["x", "y"]), (b, ["y", "x"])):
        reg.execute(encode_op("register", "vm", "h"))
        for n in order:
            reg.execute(encode_op("add_node", n, KEY_A if n == "x" else KEY_B, f"{n}:1"))
    assert a.snapshot() == b.snapshot() and a.digest() == b.digest()
    assert a.snapshot() != old
    c = VMRegistry()
    c.restore(a.snapshot())
    assert _members(c) == _members(a) and c.items() == a.items()
    c.restore(old)
    assert _members(c) == MemberSet(0, (), ()) and c.snapshot() == old
    for junk in (
        b"\x81\xa3vms\x90",
        b"\x83\xa3vms\x90\xafmembers_version\xff\xa7members\x90",
        b"\x83\xa3vms\x90\xafmembers_version\x01\xa7members\x91\x92\xa1n\xa1k",
    ):
        with pytest.raises(ProtocolError):
            c.restore(junk)


def test_decode_members_rejects_other_answers() -> None:
    for junk in (b"\xc1", encode_op("ok", "n", 1), encode_op("members", 1)):
        with pytest.raises(ProtocolError):
            decode_members(junk)


class MemberWorkload(Workload):
    """Clients racing to add and remove the same few members (and some VM ops)."""

    def next_op(self, client: str) -> bytes:
        r = self.rng.random()
        name = self.rng.choice(("m0", "m1", "m2"))
        if r < 0.45:
            key = NodeKey(bytes([self.rng.randrange(3)]) * 32).public.text
            return encode_op("add_node", name, key, f"10.0.0.{self.rng.randrange(4)}:7601")
        if r < 0.8:
            return encode_op("remove_node", name)
        return encode_op("register", self.rng.choice(self.vms), self.rng.choice(HOSTS))

    def learn(self, op: bytes, result: bytes) -> None:
        decode_result(result)  # every answer is a well-formed result


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_replica_commits_the_same_member_table(seed: int) -> None:
    c = Cluster(seed, replay=f"DWCP_SEED={seed} pytest {__file__}", quota=10)
    c.workload = MemberWorkload(random.Random(seed), 10)
    for name in c.client_names:
        c.workload.sent[name] = c.workload.done[name] = 0
    c.start()
    c.run(until=60.0)
    assert c.finished(), c.describe()
    apps = [a for a in c.checker.live_apps.values() if not a.inst.byzantine]
    done = [a for a in apps if a.ops == max(x.ops for x in apps)]  # a replica may lag
    assert len(done) >= 3
    tables = {a.inner.execute(encode_op("members")) for a in done}
    assert len(tables) == 1 and len({a.inner.digest() for a in done}) == 1
    assert decode_members(tables.pop()).version > 0
