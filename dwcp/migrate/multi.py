"""A pull from many sources at once, scheduled by ``dwcp.itp`` (issue 15).

The destination asks every source for the image's piece manifest (size, SHA-256, one
hash per piece), keeps the manifest most sources agree on (``dwcp.migrate.pieces``; a
source with another version lends the pieces they share), then runs the sans-IO
``dwcp.itp.Scheduler``: its requests become fetches of one piece each, its cancels
cancel them, and every piece is checked against the manifest before it is accepted, so a
source that sends wrong bytes is excluded and the result is still byte-identical.

Nothing is lost: the pieces are written into ``partial/ID/data`` and, once that file
is fsynced, their indexes appended to ``partial/ID/done``; a pull that stops resumes
from what ``done`` lists. The finished file is checked as a whole (SHA-256, hashed as
the pieces arrive rather than re-read at the end), fsynced and renamed into place.

This module knows no sockets: a ``Fetcher`` (the node's sessions, or a test's fake)
answers ``manifest`` and ``piece``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwcp.errors import DwcpError, IntegrityError, PeerError
from dwcp.itp import (
    Cancel,
    Chunk,
    Config,
    EwmaRates,
    Exclude,
    Holdings,
    RateEstimator,
    Request,
    Scheduler,
    StuckError,
    bound,
    split_chunks,
)
from dwcp.itp.state import EXCLUDED
from dwcp.migrate.pieces import (
    PIECE,
    Agreement,
    Fetcher,
    PieceManifest,
    agree,
    build_manifest,
    piece_hash,
    read_piece,
)

TICK = 0.1  # seconds between the scheduler's clock events
FLUSH = 0.5  # seconds between fsyncs of the data file and the done journal
REORDER = 32 << 20  # bytes of pieces held ahead of the whole-file hash (then re-read)
MAX_EVENTS = 100  # the scheduler's last decisions (deaths, moves, rate changes) in a result


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
    phases: dict[str, float] = field(default_factory=dict)  # agree, pieces, finish (seconds)

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
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
        }


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
        view = memoryview(data)
        while view:  # a short write (a full disk) is retried, then fails with ENOSPC
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
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


class _WholeHash:
    """The image's SHA-256, fed the verified pieces as they arrive, in order.

    Why: re-reading and hashing the whole file after the last piece was the pull's
    serial tail (seconds per GiB on a loaded host). Pieces that arrive ahead of the next
    one wait in memory up to ``REORDER`` bytes; the ones past that, and those resumed
    from an interrupted pull, ``finish`` reads back from the data file.
    """

    def __init__(self, m: PieceManifest) -> None:
        self._m = m
        self._h = hashlib.sha256()
        self._next = 0
        self._ahead: dict[int, bytes] = {}
        self._held = 0

    def add(self, idx: int, data: bytes) -> None:
        if idx < self._next or idx in self._ahead:
            return
        if idx != self._next:
            if self._held + len(data) <= REORDER:
                self._ahead[idx] = data
                self._held += len(data)
            return
        self._h.update(data)
        self._next += 1
        while (d := self._ahead.pop(self._next, None)) is not None:
            self._held -= len(d)
            self._h.update(d)
            self._next += 1

    def finish(self, path: Path) -> str:
        """The rest from memory or ``path`` (blocking: run it in a thread)."""
        m, n = self._m, len(self._m.hashes)
        with open(path, "rb") as f:
            while self._next < n:
                d = self._ahead.pop(self._next, None)
                if d is None:
                    off = self._next * m.piece
                    f.seek(off)
                    d = f.read(min(m.piece, m.size - off))
                self._h.update(d)
                self._next += 1
        return self._h.hexdigest()


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
    equal_split: bool = False,
) -> PullResult:
    """Fetch ``name`` from ``sources``; ``place(manifest)`` gives (output path, partial dir).

    ``rates`` (PBA's estimator) or ``prior`` (bytes/s per source) seed the shares; the
    default prior is 1 MB/s each, corrected by measurement within a second. Sources with
    another version of the image lend the pieces it shares. ``equal_split`` is the
    naive way, kept to compare with: one equal contiguous run per full holder.
    """
    t0 = time.monotonic()
    ag = await agree(fetcher, sources, name, piece)
    if equal_split:
        ag.excluded.update(dict.fromkeys(ag.partial, "equal split: full holders only"))
        ag.partial.clear()
    out_path, partial = place(ag.manifest)
    journal = await asyncio.to_thread(_Journal, partial, ag.manifest)
    try:
        result = await _run(
            fetcher, ag, ag.holdings(equal_split), journal, out_path, t0,
            rates or EwmaRates({s: (prior or {}).get(s, 1e6) for s in ag.sources}),
            rtt, config, on_progress,
        )  # fmt: skip
    finally:
        journal.close()
    await asyncio.to_thread(shutil.rmtree, partial, True)  # the image is in place
    return result


async def _run(
    fetcher: Fetcher,
    ag: Agreement,
    holdings: Holdings,
    journal: _Journal,
    out_path: Path,
    t0: float,
    rates: RateEstimator,
    rtt: Mapping[str, float] | None,
    config: Config | None,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> PullResult:
    m = ag.manifest
    result = PullResult(name=out_path.name, sha256=m.sha256, bytes=m.size)
    result.excluded.update(ag.excluded)
    result.phases["agree"] = time.monotonic() - t0
    chunks = [c for c in split_chunks(m.size, m.piece) if c.index not in journal.done]
    result.bytes_resumed = m.size - sum(c.size for c in chunks)
    by_index = {c.index: c for c in chunks}
    sched = Scheduler(chunks, ag.sources, rates, holdings, config, rtt)
    whole = _WholeHash(m)
    loop = asyncio.get_running_loop()
    base = loop.time()
    flights: dict[tuple[str, int], asyncio.Task[bytes]] = {}
    arrived: asyncio.Queue[tuple[str, int, bytes | BaseException]] = asyncio.Queue()

    def now() -> float:
        return loop.time() - base

    async def fetch(src: str, c: Chunk) -> bytes:
        return await fetcher.piece(src, ag.sha_of(src), c.offset, c.size)

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
            if ok:
                if idx not in journal.done:
                    journal.write(idx, c.offset, got)
                whole.add(idx, got)
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
    result.phases["pieces"] = time.monotonic() - t0 - result.phases["agree"]
    await asyncio.to_thread(journal.flush)
    got_sha = await asyncio.to_thread(whole.finish, journal.data_path)
    if got_sha != m.sha256:
        journal.done_path.unlink(missing_ok=True)
        raise IntegrityError(
            f"the pulled {m.name} has SHA-256 {got_sha}, not {m.sha256}; its pieces were "
            "dropped: re-run the pull"
        )
    await asyncio.to_thread(_place, journal.data_path, out_path)
    _report(result, sched, ag, [(c.index, c.size) for c in chunks], time.monotonic() - t0)
    result.phases["finish"] = result.seconds - result.phases["agree"] - result.phases["pieces"]
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


def _report(
    result: PullResult,
    sched: Scheduler,
    ag: Agreement,
    pieces: list[tuple[int, int]],
    seconds: float,
) -> None:
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
    # An excluded source's bytes were all rejected: it gave no capacity. A dead one
    # delivered until it died, so it stays in, at its rate while busy.
    live = {s: r for s, r in measured.items() if r > 0 and rep.sources[s].state != EXCLUDED}
    groups = [(b, frozenset(h for h in hs if h in live)) for b, hs in ag.groups(pieces)]
    if live and all(hs for _, hs in groups):
        # T* with the subsets: pieces only some sources hold bound the time too.
        t = bound(groups, live)
        result.bound_seconds = t if math.isfinite(t) else None


__all__ = [
    "PIECE",
    "Agreement",
    "Fetcher",
    "PieceManifest",
    "PullResult",
    "agree",
    "build_manifest",
    "pull",
    "read_piece",
    "resumable",
]
