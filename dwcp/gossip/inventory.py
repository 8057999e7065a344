"""ASS inventories: who holds which image, Scuttlebutt-style anti-entropy (sans-IO).

Each origin owns versioned keys (``img/<name>`` -> ``"<size> <sha256>"``). Two members
swap digests ``{origin: highest version}`` and each answers with the deltas the other
lacks, oldest version first per origin, truncated to a byte budget: a truncated answer
leaves no gap, so the receiver's highest version per origin stays a true summary.

Versions start at the origin's wall clock in microseconds, so a restarted origin's new
life outranks the old one; its first delta, ``gen`` = the life's first version, tells
receivers to drop the keys of earlier lives (images deleted while it was down vanish).
A deleted key in the same life is a tombstone (value ``None``).

The wire form is JSON behind a 2-byte tag (``b"DI"``): the values are short strings and
the deltas are bounded by the budget, so a schema-free codec costs nothing that matters.
"""

from __future__ import annotations

import json
import time
from typing import Any

from dwcp.errors import ProtocolError

TAG = b"DI"
GEN = "gen"
MAX_BODY = 60_000
Delta = tuple[str, str, int, str | None]  # origin, key, version, value (None: deleted)


class Inventory:
    """This member's copy of every origin's keys; ``me`` owns its own."""

    def __init__(self, me: str, *, now_us: int | None = None) -> None:
        self.me = me
        self.keys: dict[str, dict[str, tuple[int, str | None]]] = {me: {}}
        self.top: dict[str, int] = {}
        self.gens: dict[str, int] = {}
        self._version = now_us if now_us is not None else time.time_ns() // 1000
        self._put(me, GEN, self._version, str(self._version))

    def _put(self, origin: str, key: str, version: int, value: str | None) -> None:
        self.keys.setdefault(origin, {})[key] = (version, value)
        self.top[origin] = max(self.top.get(origin, 0), version)

    def set_local(self, items: dict[str, str]) -> bool:
        """Make this member's keys exactly ``items`` (besides ``gen``); True if any changed."""
        mine = self.keys[self.me]
        changed = False
        for key, value in sorted(items.items()):
            if key == GEN:
                raise ValueError("'gen' is reserved")
            if mine.get(key, (0, None))[1] != value:
                self._version += 1
                self._put(self.me, key, self._version, value)
                changed = True
        for key, (_, old) in list(mine.items()):
            if key != GEN and key not in items and old is not None:
                self._version += 1
                self._put(self.me, key, self._version, None)
                changed = True
        return changed

    def digest(self) -> dict[str, int]:
        return dict(self.top)

    def deltas_for(self, digest: dict[str, int], budget: int = 8000) -> list[Delta]:
        """What a member with ``digest`` lacks, oldest first per origin, within ``budget``."""
        out: list[Delta] = []
        used = 0
        for origin, keys in self.keys.items():
            have = digest.get(origin, 0)
            if self.top.get(origin, 0) <= have:
                continue
            newer = sorted((v, k, val) for k, (v, val) in keys.items() if v > have)
            for version, key, value in newer:
                size = len(origin) + len(key) + len(value or "") + 32
                if used + size > budget:
                    return out
                used += size
                out.append((origin, key, version, value))
        return out

    def apply(self, deltas: list[Delta], admitted: set[str] | None = None) -> set[str]:
        """Take newer values; return the origins whose keys changed."""
        changed: set[str] = set()
        for origin, key, version, value in deltas:
            if origin == self.me or (admitted is not None and origin not in admitted):
                continue
            keys = self.keys.setdefault(origin, {})
            if version < self.gens.get(origin, 0):
                continue  # from an earlier life of this origin
            if key == GEN and version > self.gens.get(origin, 0):
                # a new life of this origin: what its earlier lives said is void
                keys.clear()
                self.gens[origin] = version
            if keys.get(key, (0, None))[0] >= version:
                continue
            self._put(origin, key, version, value)
            changed.add(origin)
        return changed

    def images(self, origin: str) -> dict[str, str]:
        """``name -> "<size> <sha256>"`` that ``origin`` holds, as far as this member knows."""
        return {
            k[4:]: v
            for k, (_, v) in self.keys.get(origin, {}).items()
            if k.startswith("img/") and v is not None
        }

    def where(self, image: str) -> list[dict[str, Any]]:
        """The origins holding ``image`` (its name, or its SHA-256 content id)."""
        out = []
        for origin in sorted(self.keys):
            for name, value in self.images(origin).items():
                size, _, sha = value.partition(" ")
                if image in (name, sha):
                    out.append({"member": origin, "name": name, "size": int(size), "sha256": sha})
        return out


# push-pull legs: a request carries a digest; the response the deltas the requester lacks
# and the responder's digest; the final leg the deltas the responder lacks
REQUEST, RESPONSE, FINAL = 0, 1, 2


def encode_sync(digest: dict[str, int], deltas: list[Delta], leg: int) -> bytes:
    return TAG + json.dumps({"d": digest, "x": deltas, "r": leg}).encode()


def decode_sync(body: bytes) -> tuple[dict[str, int], list[Delta], int]:
    """Decode an anti-entropy message; ``ProtocolError`` for anything malformed."""
    if len(body) > MAX_BODY or body[:2] != TAG:
        raise ProtocolError("not an inventory message")
    try:
        doc = json.loads(body[2:])
        digest = {str(k): int(v) for k, v in doc["d"].items()}
        deltas: list[Delta] = []
        for origin, key, version, value in doc["x"]:
            if not isinstance(origin, str) or not isinstance(key, str):
                raise TypeError("origin and key are strings")
            if value is not None and not isinstance(value, str):
                raise TypeError("a value is a string or null")
            deltas.append((origin, key, int(version), value))
        leg = int(doc["r"])
        if leg not in (REQUEST, RESPONSE, FINAL):
            raise ValueError(f"unknown leg {leg}")
        return digest, deltas, leg
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"malformed inventory message: {exc}") from exc
