"""Node identity: Ed25519 key pairs (pynacl), their files and their text form.

A node is known by its public key. The text form ``ed25519:<base64>`` is what
operators paste into configs and ``--trust``; the node id (16 hex digits of a
BLAKE2b hash of the key) is a short, stable name for logs and metrics.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from dwcp.errors import AuthenticationError, KeyFileError

PUBLIC_PREFIX = "ed25519:"
PRIVATE_PREFIX = "dwcp-ed25519-private:"
KEY_BYTES = 32
SIGNATURE_BYTES = 64


def node_id_of(public_key: bytes) -> str:
    """Return the short node id derived from a 32-byte public key."""
    return hashlib.blake2b(public_key, digest_size=8).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A peer's Ed25519 verify key, with its text form and node id."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_BYTES:
            raise KeyFileError(f"an Ed25519 public key is {KEY_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse ``ed25519:<base64>`` (or bare base64), or read it from a ``.pub`` file path."""
        text = text.strip()
        if not text.startswith(PUBLIC_PREFIX) and os.path.isfile(text):
            text = Path(text).read_text(encoding="ascii").strip()
        body = text.removeprefix(PUBLIC_PREFIX)
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyFileError(
                f"not a public key: {text[:60]!r}; expected '{PUBLIC_PREFIX}<base64>' "
                "as printed by 'dwcp keygen', or the path of a .pub file"
            ) from exc
        if len(raw) != KEY_BYTES:
            raise KeyFileError(
                f"public key {text[:60]!r} decodes to {len(raw)} bytes, expected {KEY_BYTES}"
            )
        return cls(raw)

    @property
    def text(self) -> str:
        return PUBLIC_PREFIX + base64.b64encode(self.raw).decode("ascii")

    @property
    def node_id(self) -> str:
        return node_id_of(self.raw)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise ``AuthenticationError`` unless ``signature`` signs ``message`` with this key."""
        if len(signature) != SIGNATURE_BYTES:
            raise AuthenticationError(f"signature is {len(signature)} bytes, expected 64")
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
        except nacl.exceptions.BadSignatureError as exc:
            raise AuthenticationError(
                f"bad signature from node {self.node_id}: the message was altered "
                "or signed by another key"
            ) from exc

    def __str__(self) -> str:
        return self.text


class NodeKey:
    """A node's Ed25519 signing key."""

    __slots__ = ("_signing", "public")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != KEY_BYTES:
            raise KeyFileError(f"an Ed25519 private key seed is {KEY_BYTES} bytes")
        self._signing = nacl.signing.SigningKey(seed)
        self.public = PublicKey(bytes(self._signing.verify_key))

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing)

    @property
    def node_id(self) -> str:
        return self.public.node_id

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte detached signature of ``message``."""
        return bytes(self._signing.sign(message).signature)

    # --- files ---------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the private key (mode 0600) to ``path`` and the public key to ``path.pub``."""
        p = Path(path)
        if p.exists() and not overwrite:
            raise KeyFileError(f"{p} already exists; remove it or choose another path")
        p.parent.mkdir(parents=True, exist_ok=True)
        text = PRIVATE_PREFIX + base64.b64encode(self.seed).decode("ascii") + "\n"
        tmp = p.with_name(p.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        Path(str(p) + ".pub").write_text(self.public.text + "\n", encoding="ascii")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeKey:
        """Read a private key file, refusing one that other users can read."""
        p = Path(path)
        try:
            st = p.stat()
            text = p.read_text(encoding="ascii").strip()
        except FileNotFoundError as exc:
            raise KeyFileError(
                f"key file {p} not found; create one with 'dwcp keygen {p}'"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read key file {p}: {exc}") from exc
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {p} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run 'chmod 600 {p}'"
            )
        if not text.startswith(PRIVATE_PREFIX):
            raise KeyFileError(f"{p} is not a dwcp private key (expected '{PRIVATE_PREFIX}...')")
        try:
            seed = base64.b64decode(text.removeprefix(PRIVATE_PREFIX), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyFileError(f"{p}: the key is not valid base64") from exc
        if len(seed) != KEY_BYTES:
            raise KeyFileError(f"{p}: the key is {len(seed)} bytes, expected {KEY_BYTES}")
        return cls(seed)
