from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dwcp.cli import main
from dwcp.errors import AuthenticationError, KeyFileError
from dwcp.identity import NodeKey, PublicKey


def test_key_roundtrip_and_mode(tmp_path: Path) -> None:
    key = NodeKey.generate()
    path = tmp_path / "node.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = NodeKey.load(path)
    assert again.public == key.public
    assert PublicKey.parse(str(path) + ".pub") == key.public
    assert PublicKey.parse(key.public.text) == key.public


def test_sign_verify() -> None:
    key = NodeKey.generate()
    sig = key.sign(b"hello")
    key.public.verify(b"hello", sig)
    with pytest.raises(AuthenticationError):
        key.public.verify(b"hellO", sig)
    with pytest.raises(AuthenticationError):
        NodeKey.generate().public.verify(b"hello", sig)


def test_refuses_world_readable_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    NodeKey.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        NodeKey.load(path)


@pytest.mark.parametrize("text", ["ed25519:", "ed25519:!!!", "ed25519:AAAA", "garbage"])
def test_bad_public_keys(text: str) -> None:
    with pytest.raises(KeyFileError):
        PublicKey.parse(text)


def test_keygen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k"
    assert main(["keygen", str(path)]) == 0
    out = capsys.readouterr().out.strip()
    assert PublicKey.parse(out) == NodeKey.load(path).public
    assert main(["keygen", str(path)]) == 2  # exists: refused, key kept
    assert "already exists" in capsys.readouterr().err
