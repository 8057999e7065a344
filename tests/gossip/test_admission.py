"""The admitted set: gossip.toml's bootstrap members changed by the committed member table."""

from __future__ import annotations

from dwcp.consensus.members import MemberSet
from dwcp.gossip.admission import AdmittedMember, effective
from dwcp.identity import NodeKey
from dwcp.node.config import parse_address

KEYS = {n: NodeKey(n.encode() * 32).public for n in "abcd"}


def member(name: str, port: int) -> AdmittedMember:
    return AdmittedMember(name, KEYS[name], parse_address(f"127.0.0.1:{port}", default_port=None))


def test_the_table_adds_removes_and_replaces_bootstrap_members() -> None:
    boot = (member("a", 1), member("b", 2), member("c", 3))
    assert effective(boot, MemberSet(0, (), ())) == list(boot)
    table = MemberSet(
        3,
        (("d", KEYS["d"].text, "10.0.0.4:7"), ("a", KEYS["a"].text, "10.0.0.1:9")),
        ("b",),
    )
    got = {m.name: (m.key, str(m.address)) for m in effective(boot, table)}
    assert got == {
        "a": (KEYS["a"], "10.0.0.1:9"),  # the committed entry replaces the bootstrap one
        "c": (KEYS["c"], "127.0.0.1:3"),
        "d": (KEYS["d"], "10.0.0.4:7"),
    }


def test_a_bootstrap_member_whose_key_was_committed_under_another_name_is_dropped() -> None:
    boot = (member("a", 1), member("b", 2))
    table = MemberSet(1, (("x", KEYS["b"].text, "10.0.0.2:2"),), ())
    assert [m.name for m in effective(boot, table)] == ["a", "x"]
