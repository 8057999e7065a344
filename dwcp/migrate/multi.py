"""A pull from many sources at once, scheduled by ``dwcp.itp`` (issue 15).

The destination asks every source for the image's piece manifest (size, SHA-256, one
hash per piece), keeps the manifest most sources agree on, then runs the sans-IO
``dwcp.itp.Scheduler``: its requests become fetches of one piece each, its cancels
cancel them, and every piece is checked against the manifest before it is accepted, so a
source that sends wrong bytes is excluded and the result is still byte-identical.

Nothing is lost: the pieces are written into ``partial/ID/data`` and, once that file
is fsynced, their indexes appended to ``partial/ID/done``; a pull that stops resumes
from what ``done`` lists. The finished file is checked as a whole (SHA-256), fsynced and
renamed into place.

This module knows no sockets: a ``Fetcher`` (the node's sessions, or a test's fake)
answers ``manifest`` and ``piece``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dwcp.errors import DwcpError, ImageError, IntegrityError, ManifestError, PeerError
from dwcp.itp import (
    Cancel,
    Chunk,
    Config,
    EwmaRates,
    Exclude,
    ExplicitHoldings,
    RateEstimator,
    Request,
    Scheduler,
    StuckError,
    bound,
    split_chunks,
)

PIECE = 512 * 1024  # one piece per request: under the transport's 1 MiB frame
HASH_HEX = 32  # hex digits of each piece's SHA-256 kept in the manifest (128 bits)
MAX_PIECES = 24_000  # keeps the manifest reply under the 1 MiB frame
TICK = 0.1  # seconds between the scheduler's clock events
FLUSH = 0.5  # seconds between fsyncs of the data file and the done journal
MANIFEST_TIMEOUT = 30.0
MAX_EVENTS = 100  # the scheduler's last decisions (deaths, moves, rate changes) in a result


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
class PullResult:
    name: str
    sha256: str
    bytes: int
    seconds: float = 0.0
    bytes_wire: int = 0
    duplicate_bytes: int = 0
    rejected_bytes: int = 0
    bytes_resumed: int = 0
    bound_seconds: float | None = None
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (unix time, source, what)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "bytes_wire": self.bytes_wire,
            "duplicate_bytes": self.duplicate_bytes,
            "rejected_bytes": self.rejected_bytes,
            "bytes_resumed": self.bytes_resumed,
            "bound_seconds": None if self.bound_seconds is None else round(self.bound_seconds, 3),
            "sources": self.sources,
            "excluded": self.excluded,
            "events": [[round(t, 3), s, w] for t, s, w in self.events[-MAX_EVENTS:]],
        }


async def agree(
    fetcher: Fetcher, sources: Sequence[str], name: str, piece: int = PIECE
) -> tuple[PieceManifest, list[str], dict[str, str]]:
    """Ask every source for its manifest: the one most agree on, its holders, the others."""

    async def one(s: str) -> PieceManifest:
        async with asyncio.timeout(MANIFEST_TIMEOUT):
            raw = await fetcher.manifest(s, name, piece)
        return PieceManifest.from_json(raw)

    got = await asyncio.gather(*(one(s) for s in sources), return_exceptions=True)
    excluded: dict[str, str] = {}
    ok: dict[str, PieceManifest] = {}
    for s, r in zip(sources, got, strict=True):
        if isinstance(r, PieceManifest):
            ok[s] = r
        elif isinstance(r, (DwcpError, TimeoutError, OSError)):
            excluded[s] = f"no manifest: {r or type(r).__name__}"
        elif isinstance(r, BaseException):
            raise r
    if not ok:
        detail = "; ".join(f"{s}: {why}" for s, why in excluded.items())
        raise ImageError(f"no source holds {name} ({detail or 'no sources given'})")
    votes = Counter(m.key() for m in ok.values())
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        votes = Counter({k: v for k, v in votes.items() if k[1] == name}) or votes
    best = votes.most_common(1)[0][0]
    chosen = next(m for m in ok.values() if m.key() == best)
    holders = [s for s in sources if s in ok and ok[s].key() == best]
    for s, m in ok.items():
        if m.key() != best:
            excluded[s] = f"holds a different image under {name} (sha256 {m.sha256[:12]})"
    return chosen, holders, excluded


class _Journal:
    """``partial/ID``: the data file and the indexes of the pieces it holds (verified)."""

    def __init__(self, root: Path, m: PieceManifest) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_path = root / "data"
        self.done_path = root / "done"
        meta = root / "manifest.json"
        if not meta.exists() or meta.read_bytes() != m.to_json():
            for p in (self.data_path, self.done_path):  # another image's leftovers
                p.unlink(missing_ok=True)
            tmp = root / ".manifest.tmp"
            tmp.write_bytes(m.to_json())
            os.replace(tmp, meta)
        self.done: set[int] = set()
        if self.done_path.exists():
            for line in self.done_path.read_text("ascii", "replace").split():
                if line.isdigit() and int(line) < len(m.hashes):
                    self.done.add(int(line))
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.fd = fd
        if os.fstat(fd).st_size != m.size:
            os.ftruncate(fd, m.size)
        self._pending: list[int] = []

    def write(self, chunk: int, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        self._pending.append(chunk)

    def flush(self) -> None:
        """Data first, then the journal: ``done`` never names a piece not on disk."""
        if not self._pending:
            return
        os.fsync(self.fd)
        with open(self.done_path, "a", encoding="ascii") as f:
            f.write("".join(f"{c}\n" for c in self._pending))
            f.flush()
            os.fsync(f.fileno())
        self.done.update(self._pending)
        self._pending.clear()

    def close(self) -> None:
        os.close(self.fd)


def resumable(partial: Path, m: PieceManifest) -> set[int]:
    """The pieces a pull of ``m`` into ``partial`` would not fetch again (read-only: what
    ``--dry-run`` reports; a journal of another image counts for nothing)."""
    try:
        if (partial / "manifest.json").read_bytes() != m.to_json():
            return set()
        text = (partial / "done").read_text("ascii", "replace")
    except OSError:
        return set()
    return {int(t) for t in text.split() if t.isdigit() and int(t) < len(m.hashes)}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


async def pull(
    fetcher: Fetcher,
    sources: Sequence[str],
    name: str,
    place: Callable[[PieceManifest], tuple[Path, Path]],
    *,
    rates: RateEstimator | None = None,
    prior: Mapping[str, float] | None = None,
    rtt: Mapping[str, float] | None = None,
    config: Config | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    piece: int = PIECE,
) -> PullResult:
    """Fetch ``name`` from ``sources``; ``place(manifest)`` gives (output path, partial dir).

    ``rates`` (PBA's estimator) or ``prior`` (bytes/s per source) seed the shares; the
    default prior is 1 MB/s each, corrected by measurement within a second.
    """
    t0 = time.monotonic()
    m, holders, excluded = await agree(fetcher, sources, name, piece)
    out_path, partial = place(m)
    journal = await asyncio.to_thread(_Journal, partial, m)
    try:
        result = await _run(
            fetcher, m, holders, excluded, journal, out_path, t0,
            rates or EwmaRates({s: (prior or {}).get(s, 1e6) for s in holders}),
            rtt, config, on_progress,
        )  # fmt: skip
    finally:
        journal.close()
    await asyncio.to_thread(shutil.rmtree, partial, True)  # the image is in place
    return result


async def _run(
    fetcher: Fetcher,
    m: PieceManifest,
    holders: list[str],
    excluded: dict[str, str],
    journal: _Journal,
    out_path: Path,
    t0: float,
    rates: RateEstimator,
    rtt: Mapping[str, float] | None,
    config: Config | None,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> PullResult:
    result = PullResult(name=out_path.name, sha256=m.sha256, bytes=m.size)
    result.excluded.update(excluded)
    chunks = [c for c in split_chunks(m.size, m.piece) if c.index not in journal.done]
    result.bytes_resumed = m.size - sum(c.size for c in chunks)
    by_index = {c.index: c for c in chunks}
    sched = Scheduler(chunks, holders, rates, ExplicitHoldings(holders), config, rtt)
    loop = asyncio.get_running_loop()
    base = loop.time()
    flights: dict[tuple[str, int], asyncio.Task[bytes]] = {}
    arrived: asyncio.Queue[tuple[str, int, bytes | BaseException]] = asyncio.Queue()

    def now() -> float:
        return loop.time() - base

    async def fetch(src: str, c: Chunk) -> bytes:
        return await fetcher.piece(src, m.sha256, c.offset, c.size)

    def launched(key: tuple[str, int], task: asyncio.Task[bytes]) -> None:
        def done(t: asyncio.Task[bytes]) -> None:
            if flights.get(key) is not t or t.cancelled():
                return
            exc = t.exception()
            arrived.put_nowait((key[0], key[1], exc if exc is not None else t.result()))

        task.add_done_callback(done)

    def act(actions: Sequence[Request | Cancel | Exclude]) -> None:
        for a in actions:
            if isinstance(a, Request):
                key = (a.source, a.chunk)
                task = asyncio.ensure_future(fetch(a.source, by_index[a.chunk]))
                flights[key] = task
                launched(key, task)
            elif isinstance(a, Cancel):
                t = flights.pop((a.source, a.chunk), None)
                if t is not None:
                    t.cancel()
            else:
                result.excluded[a.source] = a.reason
                for key in [k for k in flights if k[0] == a.source]:
                    flights.pop(key).cancel()

    last_flush = now()
    try:
        if chunks:
            act(sched.start(now()))
        while not sched.done:
            try:
                sched.check()
            except StuckError as exc:
                raise PeerError(f"{exc} ({_why(sched)})") from None
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that
                # lands as the item arrives (gh-86296), and the pull ran on cancelled
                async with asyncio.timeout(TICK):
                    src, idx, got = await arrived.get()
            except TimeoutError:
                act(sched.tick(now()))
                continue
            flights.pop((src, idx), None)
            if isinstance(got, BaseException):
                if not isinstance(got, (DwcpError, OSError, TimeoutError)):
                    raise got
                reason = f"{type(got).__name__}: {got}"
                act(sched.on_source_lost(src, now(), reason))
                continue
            c = by_index[idx]
            act(sched.on_progress(src, idx, len(got), now()))
            ok = len(got) == c.size and piece_hash(got) == m.hashes[idx]
            if ok and idx not in journal.done:
                journal.write(idx, c.offset, got)
            act(sched.on_chunk(src, idx, ok, now()))
            if now() - last_flush >= FLUSH:
                await asyncio.to_thread(journal.flush)
                last_flush = now()
                if on_progress is not None:
                    on_progress({"phase": "pulling", "pieces_done": len(journal.done)})
            act(sched.tick(now()))
    except BaseException:
        for t in flights.values():
            t.cancel()
        await asyncio.gather(*flights.values(), return_exceptions=True)
        await asyncio.to_thread(journal.flush)  # what arrived is kept for the resume
        raise
    for t in flights.values():
        t.cancel()
    await asyncio.gather(*flights.values(), return_exceptions=True)
    await asyncio.to_thread(journal.flush)
    got_sha = await asyncio.to_thread(_file_sha256, journal.data_path)
    if got_sha != m.sha256:
        journal.done_path.unlink(missing_ok=True)
        raise IntegrityError(
            f"the pulled {m.name} has SHA-256 {got_sha}, not {m.sha256}; its pieces were "
            "dropped: re-run the pull"
        )
    await asyncio.to_thread(_place, journal.data_path, out_path)
    _report(result, sched, m, time.monotonic() - t0)
    wall = time.time() - now()  # the scheduler's clock is seconds since `base`
    result.events = [(wall + t, s, w) for t, s, w in sched.report().events]
    return result


def _why(sched: Scheduler) -> str:
    rep = sched.report().sources
    return "; ".join(f"{s}: {r.state} {r.reason}" for s, r in rep.items()) or "no sources"


def _place(data: Path, out: Path) -> None:
    """fsync, then an atomic rename into place, then the directory's fsync."""
    fd = os.open(data, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(data, out)
    dfd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _report(result: PullResult, sched: Scheduler, m: PieceManifest, seconds: float) -> None:
    rep = sched.report()
    result.seconds = seconds
    result.bytes_wire = rep.bytes_wire
    result.duplicate_bytes = rep.duplicate_bytes
    result.rejected_bytes = rep.rejected_bytes
    measured: dict[str, float] = {}
    for s, r in rep.sources.items():
        rate = r.bytes_wire / r.busy_seconds if r.busy_seconds > 0 else 0.0
        measured[s] = rate
        result.sources[s] = {
            "bytes": r.bytes_ok,
            "bytes_wire": r.bytes_wire,
            "rate": round(rate, 1),
            "state": r.state,
            "reason": r.reason,
        }
    live = {s: r for s, r in measured.items() if r > 0}
    if live:
        need = m.size - result.bytes_resumed
        t = bound([(need, frozenset(live))], live)
        result.bound_seconds = t if math.isfinite(t) else None


__all__ = [
    "PIECE",
    "Fetcher",
    "PieceManifest",
    "PullResult",
    "agree",
    "build_manifest",
    "pull",
    "read_piece",
    "resumable",
]
