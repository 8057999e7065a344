"""Gossip datagrams: only admitted, correctly signed, fresh ones are opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from dwcp.errors import AuthenticationError, ConfigError, ProtocolError
from dwcp.gossip.admission import load_admission
from dwcp.gossip.auth import Signer, Verifier
from dwcp.identity import NodeKey


def test_open_checks_member_signature_and_freshness() -> None:
    a, b = NodeKey.generate(), NodeKey.generate()
    v = Verifier({"a": a.public})
    s = Signer(a, "a")
    d1, d2, d3 = s.seal(b"one"), s.seal(b"two"), s.seal(b"three")
    assert v.open(d3) == ("a", b"three")
    assert v.open(d1) == ("a", b"one")  # reordered within the window: accepted once
    with pytest.raises(AuthenticationError):
        v.open(d1)  # replay
    assert v.open(d2)[1] == b"two"
    with pytest.raises(AuthenticationError):
        v.open(Signer(b, "b").seal(b"x"))  # not admitted
    with pytest.raises(AuthenticationError):
        v.open(Signer(b, "a").seal(b"x"))  # another key under a member's name
    tampered = bytearray(s.seal(b"four"))
    tampered[-70] ^= 1
    with pytest.raises(AuthenticationError):
        v.open(bytes(tampered))
    for junk in (b"", b"DGE1", b"DGE1\x05ab", b"x" * 200):
        with pytest.raises(ProtocolError):
            v.open(junk)
    assert v.dropped == {"malformed": 4, "not_admitted": 1, "forged": 2, "replay": 1}


def test_old_counters_beyond_the_window_are_refused() -> None:
    a = NodeKey.generate()
    v = Verifier({"a": a.public})
    s = Signer(a, "a")
    old = s.seal(b"old")
    for _ in range(70):
        v.open(s.seal(b"x"))
    with pytest.raises(AuthenticationError):
        v.open(old)


def test_admission_file(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    assert load_admission(cfg) is None
    k = NodeKey.generate().public.text
    (tmp_path / "gossip.toml").write_text(
        f'listen = "127.0.0.1:7601"\n[[members]]\nname = "a"\nkey = "{k}"\n'
        'address = "127.0.0.1:7601"\n'
    )
    adm = load_admission(cfg)
    assert adm is not None and adm.by_name()["a"].address.port == 7601
    (tmp_path / "gossip.toml").write_text('listen = "127.0.0.1:7601"\nperiod = 0\n')
    with pytest.raises(ConfigError, match="period"):
        load_admission(cfg)
    (tmp_path / "gossip.toml").write_text(
        f'listen = "h:1"\n[[members]]\nname = "a"\nkey = "{k}"\naddress = "h:2"\n'
        f'[[members]]\nname = "b"\nkey = "{k}"\naddress = "h:3"\n'
    )
    with pytest.raises(ConfigError, match="share a key"):
        load_admission(cfg)
