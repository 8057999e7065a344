"""The node's multi-source pulls (issue 15): ``dwcp pull NAME [--from PEER ...]``.

As a source, the node answers two requests on its peer sessions: ``pull-manifest``
(an image's piece hashes, computed once per file version and cached) and ``pull-piece``
(bytes of an image named by its SHA-256). As a destination, the control operation
``pull`` runs ``dwcp.migrate.multi.pull`` over one session per source, seeded with
PBA's pessimistic (P10) rate for each path it has history for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dwcp.errors import DwcpError, RemoteError, UsageError
from dwcp.identity import PublicKey
from dwcp.itp import Config, bound
from dwcp.migrate.multi import (
    PIECE,
    PieceManifest,
    agree,
    build_manifest,
    pull,
    read_piece,
    resumable,
)
from dwcp.node.config import Peer
from dwcp.node.context import NodeContext
from dwcp.node.control import Emit, Handler
from dwcp.node.service import BaseService
from dwcp.node.store import check_image_name

log = logging.getLogger("dwcp.node")
MAX_PIECE = (1 << 20) - 4096  # a reply must fit one transport frame
PIECE_TIMEOUT = 60.0  # one piece's request; the scheduler moves work long before
# A pull sees each piece only whole (one reply each), and a source's replies in flight
# share its link and finish together: a stall is judged over three windows of pieces at
# the source's rate, never under 1.5 s (a killed source's work moves within 2 s), and
# three requests in flight keep the link busy while the next ones cross it.
# tests/itp/test_stall.py runs this configuration in virtual time.
PULL_CONFIG = Config(stall_timeout=1.5, stall_pieces=3.0, measure_interval=1.0, min_window=3)
PULL_PIECE = 256 * 1024  # smaller pieces: more frequent signs of life per source
PER_SOURCE = 4  # requests on the wire per source: a few replies streaming at once


class _Cached:
    def __init__(self, path: Path, stamp: tuple[int, int], manifest: PieceManifest) -> None:
        self.path, self.stamp, self.manifest = path, stamp, manifest


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _read_checked(c: _Cached, offset: int, size: int) -> bytes | None:
    """The piece, or None if the file is no longer the one its manifest describes (one
    thread hop per piece, not two: the stat and the read together)."""
    if _stamp(c.path) != c.stamp:
        return None
    return read_piece(c.path, offset, size)


class SessionFetcher:
    """``Fetcher`` over the node's peer sessions: one session per source for the pull."""

    def __init__(self, ctx: NodeContext, peers: Mapping[str, Peer]) -> None:
        self.ctx = ctx
        self.peers = peers
        self._sessions: dict[str, Any] = {}
        self._locks = {name: asyncio.Lock() for name in peers}
        self._gates = {name: asyncio.Semaphore(PER_SOURCE) for name in peers}

    async def _session(self, source: str) -> Any:
        async with self._locks[source]:
            s = self._sessions.get(source)
            if s is None or s.closed:
                async with asyncio.timeout(15):
                    s = await self.ctx.sessions.checkout(self.peers[source])
                self._sessions[source] = s
            return s

    async def manifest(self, source: str, name: str, piece: int) -> bytes:
        s = await self._session(source)
        reply: bytes = await s.request(f"pull-manifest\n{name}\n{piece}".encode(), timeout=60)
        return reply

    async def piece(self, source: str, sha256: str, offset: int, size: int) -> bytes:
        s = await self._session(source)
        async with self._gates[source]:
            body = f"pull-piece\n{sha256}\n{offset}\n{size}".encode()
            reply: bytes = await s.request(body, timeout=PIECE_TIMEOUT)
            return reply

    def close(self) -> None:
        for s in self._sessions.values():
            self.ctx.sessions.checkin(s, reuse=not s.closed)
        self._sessions.clear()


class Pulls(BaseService):
    name = "pulls"

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._cache: dict[str, _Cached] = {}  # by sha256
        self._by_path: dict[tuple[Path, int], _Cached] = {}
        self._hashing: dict[tuple[Path, int], asyncio.Lock] = {}
        self.pulling: set[str] = set()
        # Each source's rate in this node's last pull from it (bytes/s while busy): the
        # prior where PBA has no history for the path, so a pull does not start from an
        # equal split and spend its first second correcting it.
        self._measured: dict[str, float] = {}
        ctx.sessions.add_request_handler("pull-manifest", self._on_manifest)
        ctx.sessions.add_request_handler("pull-piece", self._on_piece)

    def handlers(self) -> Mapping[str, Handler]:
        return {"pull": self.op_pull}

    # --- as a source ------------------------------------------------------------------

    async def _find(self, name: str) -> Path:
        store = self.ctx.store
        try:
            p = store.image_path(name)
        except UsageError:
            p = None
        if p is not None and p.is_file():
            return p
        d = store.images_dir.resolve()

        def by_sha(ix: Any) -> Path | None:
            ix.sync_dir(d)
            for r in ix.images():
                if r.path.parent == d and r.sha256 == name:
                    return Path(r.path)
            return None

        found: Path | None = await self.ctx.index.call(by_sha)
        if found is None:
            raise RemoteError("not_found", f"this node stores no image {name[:200]!r}")
        return found

    async def _on_manifest(self, peer: PublicKey, body: bytes) -> bytes:
        name, _, piece_s = body.decode("utf-8", "replace").partition("\n")
        try:
            piece = min(max(int(piece_s), 4096), MAX_PIECE)
        except ValueError:
            piece = PIECE
        path = await self._find(name)
        key = (path, piece)
        lock = self._hashing.setdefault(key, asyncio.Lock())
        async with lock:
            stamp = await asyncio.to_thread(_stamp, path)
            c = self._by_path.get(key)
            if c is None or c.stamp != stamp:
                m = await asyncio.to_thread(build_manifest, path, path.name, piece)
                if await asyncio.to_thread(_stamp, path) != stamp:
                    raise RemoteError("changed", f"{path.name} changed while hashed; retry")
                c = _Cached(path, stamp, m)
                self._by_path[key] = c
                self._cache[m.sha256] = c
        return c.manifest.to_json()

    async def _on_piece(self, peer: PublicKey, body: bytes) -> bytes:
        parts = body.decode("ascii", "replace").split("\n")
        try:
            sha, offset, size = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise RemoteError("bad_request", "pull-piece: expected SHA256, OFFSET, SIZE") from None
        c = self._cache.get(sha)
        if c is None:
            raise RemoteError("not_found", "ask pull-manifest first (unknown image sha256)")
        if not (0 <= offset <= c.manifest.size and 0 < size <= MAX_PIECE):
            raise RemoteError("bad_request", "pull-piece: offset or size out of range")
        data = await asyncio.to_thread(_read_checked, c, offset, size)
        if data is None:
            raise RemoteError("changed", f"{c.path.name} changed since its manifest; retry")
        return data

    # --- as the destination -----------------------------------------------------------

    async def op_pull(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Control operation ``pull``: {name, from?: [peer names], equal_split?: bool}
        (``equal_split``: the naive way, one equal run per source, to compare with)."""
        ctx = self.ctx
        if ctx.draining:
            raise UsageError("the node is shutting down; re-run when it is back")
        await ctx.reload()
        name = str(args.get("name") or "")
        if not name:
            raise UsageError("no image name given")
        wanted = [str(p) for p in (args.get("from") or [])]
        peers = [ctx.config.peer(p) for p in wanted] if wanted else list(ctx.config.peers)
        if not peers:
            raise UsageError("no peers to pull from: add one with 'dwcp peers add'")
        by_name = {p.name: p for p in peers}
        if name in self.pulling:
            raise UsageError(f"{name} is already being pulled; wait for that pull")
        prior = await asyncio.to_thread(self._priors, peers)
        fetcher = SessionFetcher(ctx, by_name)
        if args.get("dry_run"):
            try:
                return await self._dry_run(fetcher, list(by_name), name, prior)
            finally:
                fetcher.close()
        self.pulling.add(name)

        def place(m: PieceManifest) -> tuple[Path, Path]:
            out = ctx.store.image_path(check_image_name(name if name != m.sha256 else m.name))
            if out.exists():
                raise UsageError(f"this node already stores {out.name}; remove it first")
            return out, ctx.store.transfer_dir(m.sha256[:32])

        t0 = time.monotonic()
        try:
            result = await pull(
                fetcher, list(by_name), name, place, prior=prior,
                config=PULL_CONFIG, on_progress=emit, piece=PULL_PIECE,
                equal_split=bool(args.get("equal_split")),
            )  # fmt: skip
        except DwcpError as exc:
            log.info("pull of %s failed: %s", name, exc, extra={"event": "pull_failed"})
            raise
        finally:
            self.pulling.discard(name)
            fetcher.close()
        ctx.stats.bytes_received += result.bytes_wire
        for s, r in result.sources.items():
            if r["state"] == "live" and r["rate"] > 0:
                self._measured[s] = float(r["rate"])
        out = result.to_dict()
        out["seconds"] = round(time.monotonic() - t0, 3)
        out["prior"] = {s: round(r, 1) for s, r in prior.items()}
        log.info("pulled %s", name, extra={"event": "pull_ok", "result": out})
        return out

    async def _dry_run(
        self, fetcher: SessionFetcher, sources: list[str], name: str, prior: dict[str, float]
    ) -> dict[str, Any]:
        """The manifests' vote and the plan only: what a pull would fetch, from whom, and
        how long PBA's P10 rates say it takes. Nothing is fetched, written or claimed."""
        ag = await agree(fetcher, sources, name, PULL_PIECE)  # the pull's pieces, not PIECE
        m, holders, excluded = ag.manifest, ag.sources, ag.excluded
        out = self.ctx.store.image_path(check_image_name(name if name != m.sha256 else m.name))
        done = await asyncio.to_thread(resumable, self.ctx.store.transfer_dir(m.sha256[:32]), m)
        resumed = sum(min(m.piece, m.size - i * m.piece) for i in done)
        need = m.size - resumed
        rates = {s: prior[s] for s in holders}
        pieces = [(i, min(m.piece, m.size - i * m.piece)) for i in range(len(m.hashes))]
        t = bound(ag.groups([p for p in pieces if p[0] not in done]), rates) if need else 0.0
        return {
            "dry_run": True,
            "name": out.name,
            "sha256": m.sha256,
            "bytes": m.size,
            "piece": m.piece,
            "bytes_resumed": resumed,
            "bytes_to_send": need,
            "predicted_seconds": round(t, 3),
            "sources": holders,
            "partial": {s: len(ag.pieces_of(s)) for s in ag.partial},
            "excluded": excluded,
            "prior": {s: round(r, 1) for s, r in rates.items()},
            "exists": out.exists(),
        }

    def _priors(self, peers: list[Peer]) -> dict[str, float]:
        """PBA's P10 rate (bytes/s) per path with history; else the rate this node's last
        pull from that source measured; else 1 MB/s."""
        paths = self.ctx.sessions.paths
        out: dict[str, float] = {}
        for p in peers:
            d = None
            if paths is not None:
                try:
                    d = paths.predict(p.public_key.node_id, horizon_s=10.0)
                except OSError:
                    d = None
            if d is not None and d.p10 > 0:
                out[p.name] = d.p10 / 8
            else:
                out[p.name] = self._measured.get(p.name, 1e6)
        return out


__all__ = ["PULL_CONFIG", "PULL_PIECE", "Pulls", "SessionFetcher"]
