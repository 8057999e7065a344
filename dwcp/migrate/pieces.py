"""What a multi-source pull agrees on before it fetches: the piece manifest and who holds what.

Every source is asked for its piece manifest of the image (size, SHA-256, one hash per
piece); the destination keeps the one most agree on (or the one whose SHA-256 it asked
for). A source whose manifest differs is not thrown away when it shares pieces: an
older version of the image, or one built on the same base, holds every piece whose hash
at the same offset is equal, and serves those (by its own image's SHA-256). Each piece
is still checked against the chosen manifest when it arrives, so a wrong claim costs
one piece and the source, never the result.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dwcp.errors import DwcpError, ImageError, ManifestError
from dwcp.itp import ExplicitHoldings

PIECE = 512 * 1024  # one piece per request: under the transport's 1 MiB frame
HASH_HEX = 32  # hex digits of each piece's SHA-256 kept in the manifest (128 bits)
MAX_PIECES = 24_000  # keeps the manifest reply under the 1 MiB frame
MANIFEST_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class PieceManifest:
    """What a source says the image is: what each piece is checked against."""

    name: str
    size: int
    sha256: str
    piece: int
    hashes: tuple[str, ...]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "size": self.size,
                "sha256": self.sha256,
                "piece": self.piece,
                "hashes": list(self.hashes),
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PieceManifest:
        """Parse a peer's reply; anything malformed is a ``ManifestError`` (never a crash)."""
        try:
            d = json.loads(raw)
            m = cls(
                str(d["name"]),
                int(d["size"]),
                str(d["sha256"]),
                int(d["piece"]),
                tuple(str(h) for h in d["hashes"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"malformed piece manifest: {exc}") from None
        want = math.ceil(m.size / m.piece) if m.piece > 0 else -1
        if m.size < 0 or m.piece <= 0 or len(m.hashes) != want or len(m.sha256) != 64:
            raise ManifestError("piece manifest does not describe its size")
        return m

    def key(self) -> tuple[int, str, int, tuple[str, ...]]:
        return (self.size, self.sha256, self.piece, self.hashes)


def piece_hash(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()[:HASH_HEX]


def build_manifest(path: Path, name: str, piece: int = PIECE) -> PieceManifest:
    """Hash ``path`` piece by piece (blocking: run it in a thread)."""
    if piece <= 0:
        raise ValueError("piece size must be positive")
    size = path.stat().st_size
    piece = max(piece, math.ceil(size / MAX_PIECES))
    whole = hashlib.sha256()
    hashes = []
    with open(path, "rb") as f:
        while data := f.read(piece):
            whole.update(data)
            hashes.append(piece_hash(data))
    if len(hashes) != math.ceil(size / piece):
        raise ImageError(f"{path} changed while it was hashed; retry")
    return PieceManifest(name, size, whole.hexdigest(), piece, tuple(hashes))


def read_piece(path: Path, offset: int, size: int) -> bytes:
    """Blocking read of one piece for a peer (run it in a thread)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class Fetcher(Protocol):
    """How the pull reaches its sources (the node's sessions, or a test's fake)."""

    async def manifest(self, source: str, name: str, piece: int) -> bytes:
        """The source's piece manifest of ``name`` as JSON bytes."""
        ...

    async def piece(self, source: str, sha256: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the image whose SHA-256 is ``sha256``."""
        ...


@dataclass
class Agreement:
    """The chosen manifest; who holds all of it, who holds some of it, who none."""

    manifest: PieceManifest
    holders: list[str]
    partial: dict[str, PieceManifest] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        return [*self.holders, *self.partial]

    def sha_of(self, source: str) -> str:
        """The SHA-256 ``source`` knows its image by (what its pieces are asked by)."""
        p = self.partial.get(source)
        return p.sha256 if p is not None else self.manifest.sha256

    def pieces_of(self, source: str) -> frozenset[int]:
        """The pieces ``source`` holds (all of them for a full holder)."""
        m = self.manifest
        p = self.partial.get(source)
        if p is None:
            return frozenset(range(len(m.hashes)))
        return frozenset(_shared(m, p))

    def holdings(self, equal_split: bool = False) -> ExplicitHoldings:
        """Who may serve each piece. ``equal_split``: the naive way, for comparison: the
        pieces cut into one contiguous run per source, each run only its source's (no
        shares by rate, no stealing, no moves); partial holders are then left out."""
        if not equal_split:
            partial = {s: self.pieces_of(s) for s in self.partial}
            return ExplicitHoldings(self.sources, partial)
        n, k = len(self.manifest.hashes), max(len(self.holders), 1)
        runs = {s: range(i * n // k, (i + 1) * n // k) for i, s in enumerate(self.holders)}
        return ExplicitHoldings(self.holders, runs)

    def groups(self, pieces: Sequence[tuple[int, int]]) -> list[tuple[int, frozenset[str]]]:
        """``(bytes, holders)`` per distinct holder set over ``pieces`` ((index, size)):
        what ``dwcp.itp.bound`` takes for T* with the subsets."""
        held = {s: self.pieces_of(s) for s in self.sources}
        out: Counter[frozenset[str]] = Counter()
        for i, size in pieces:
            out[frozenset(s for s, cs in held.items() if i in cs)] += size
        return [(b, hs) for hs, b in out.items()]


def _shared(m: PieceManifest, other: PieceManifest) -> list[int]:
    """The pieces of ``m`` that ``other`` holds at the same offset with the same bytes."""
    if other.piece != m.piece:
        return []
    n = len(m.hashes)
    last = m.size - (n - 1) * m.piece if n else 0
    out = []
    for i, (h, o) in enumerate(zip(m.hashes, other.hashes, strict=False)):
        if h != o:
            continue
        size_o = min(other.piece, other.size - i * other.piece)
        if size_o == (m.piece if i < n - 1 else last):
            out.append(i)
    return out


async def agree(
    fetcher: Fetcher, sources: Sequence[str], name: str, piece: int = PIECE
) -> Agreement:
    """Ask every source for its manifest: the one most agree on, its full holders, the
    sources holding some of its pieces (another version), and the rest with the reason.
    Sources that do not know ``name`` (a SHA-256 they lack) are asked again by the
    chosen image's name, so an older version of it still lends its shared pieces."""

    async def one(s: str, what: str) -> PieceManifest:
        async with asyncio.timeout(MANIFEST_TIMEOUT):
            raw = await fetcher.manifest(s, what, piece)
        return PieceManifest.from_json(raw)

    async def ask(
        names: Sequence[str], what: str, excluded: dict[str, str]
    ) -> dict[str, PieceManifest]:
        got = await asyncio.gather(*(one(s, what) for s in names), return_exceptions=True)
        ok: dict[str, PieceManifest] = {}
        for s, r in zip(names, got, strict=True):
            if isinstance(r, PieceManifest):
                ok[s] = r
                excluded.pop(s, None)
            elif isinstance(r, (DwcpError, TimeoutError, OSError)):
                excluded[s] = f"no manifest: {r or type(r).__name__}"
            elif isinstance(r, BaseException):
                raise r
        return ok

    excluded: dict[str, str] = {}
    ok = await ask(sources, name, excluded)
    if not ok:
        detail = "; ".join(f"{s}: {why}" for s, why in excluded.items())
        raise ImageError(f"no source holds {name} ({detail or 'no sources given'})")
    votes = Counter(m.key() for m in ok.values())
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        votes = Counter({k: v for k, v in votes.items() if k[1] == name}) or votes
    best = votes.most_common(1)[0][0]
    chosen = next(m for m in ok.values() if m.key() == best)
    missing = [s for s in sources if s in excluded]
    if missing and chosen.name != name:
        ok.update(await ask(missing, chosen.name, excluded))
    out = Agreement(chosen, [s for s in sources if s in ok and ok[s].key() == best])
    for s in sources:
        m = ok.get(s)
        if m is None or m.key() == best:
            continue
        if _shared(chosen, m):
            out.partial[s] = m
        else:
            excluded[s] = f"holds a different image under {name} (sha256 {m.sha256[:12]})"
    out.excluded = {s: excluded[s] for s in sources if s in excluded}
    return out


__all__ = [
    "MANIFEST_TIMEOUT",
    "PIECE",
    "Agreement",
    "Fetcher",
    "PieceManifest",
    "agree",
    "build_manifest",
    "piece_hash",
    "read_piece",
]
