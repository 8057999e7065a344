"""Where fingerprints already live on this node (HDE image index).

``LocalIndex`` is the in-memory view: a C hash table of every local image's
aligned blocks, and lazily one of their CDC chunks. ``ImageIndex`` persists
manifests in sqlite under the node's data directory so a restart does not
rescan every image, updates an image only when its size, mtime or inode
changed, and commits each image in one transaction so a crash mid-update
leaves the previous, consistent state.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dwcp.delta import native
from dwcp.delta.chunking import ChunkList, chunk_file
from dwcp.delta.manifest import Manifest, scan_image
from dwcp.delta.reader import StatKey, stat_key
from dwcp.delta.tree import TREE_FANOUT
from dwcp.errors import ImageError, StorageError

log = logging.getLogger(__name__)


class LocalIndex:
    """Fingerprint lookup over a set of local images (sources)."""

    def __init__(self, chunk_loader: Callable[[int, Path], ChunkList] | None = None) -> None:
        # How to get a source's CDC chunks: computed by default, cached by ImageIndex.
        self._chunk_loader = chunk_loader or (lambda _source, path: chunk_file(path))
        self.blocks = native.FingerprintIndex()
        # 1 MiB hash-tree parents at aligned offsets: whole regions found in one lookup.
        self.parents = native.FingerprintIndex()
        self._chunks: native.FingerprintIndex | None = None
        self._chunked: set[int] = set()
        self.paths: dict[int, Path] = {}
        self.manifests: dict[int, Manifest] = {}

    def add(self, source: int, path: Path, manifest: Manifest) -> None:
        if source in self.paths:
            self.remove(source)
        self.paths[source] = path
        self.manifests[source] = manifest
        self._add_blocks(source, manifest)

    def _add_blocks(self, source: int, manifest: Manifest) -> None:
        bs, fp, fps = manifest.block_size, native.FP_BYTES, manifest.fps
        for a, b, at in manifest.iter_runs():
            self.blocks.add_blocks(fps[at * fp : (at + b - a) * fp], None, source, bs, a * bs)
        ids = manifest.group_ids
        if ids:
            group = bs * TREE_FANOUT
            offsets = array("Q", (g * group for g in ids))
            lens = array("I", [group]) * len(ids)
            self.parents.add_chunks(manifest.parents, bytes(len(ids)), offsets, lens, source)

    def remove(self, source: int) -> None:
        if source not in self.paths:
            return
        del self.paths[source]
        del self.manifests[source]
        # The table keeps one location per fingerprint: blocks that this source held first
        # and others hold too must come back from the others (adding is idempotent).
        self.blocks.remove_source(source)
        self.parents.remove_source(source)
        for other, m in self.manifests.items():
            self._add_blocks(other, m)
        if self._chunks is not None and source in self._chunked:
            self._chunks.remove_source(source)
            self._chunked.discard(source)
            self._chunked.clear()  # re-add the others' chunks on next use, for the same reason

    def path_of(self, source: int) -> Path:
        return self.paths[source]

    @property
    def chunks(self) -> native.FingerprintIndex:
        """CDC chunks of every source, computed on first use (only shifted data needs it)."""
        if self._chunks is None:
            self._chunks = native.FingerprintIndex()
        for source, path in self.paths.items():
            if source not in self._chunked:
                cl = self._chunk_loader(source, path)
                self._chunks.add_chunks(bytes(cl.fps), bytes(cl.flags), cl.offsets, cl.lens, source)
                self._chunked.add(source)
        return self._chunks

    @classmethod
    def of_files(cls, paths: list[Path]) -> LocalIndex:
        """An index of the given files, scanned now (for one-shot use such as ``dwcp delta``)."""
        index = cls()
        for i, p in enumerate(paths):
            index.add(i, p, scan_image(p, digest=False))  # bases: blocks only
        return index


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    size: int
    sha256: str
    mtime_ns: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    dev INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    manifest BLOB NOT NULL,
    chunks BLOB
);
"""


class ImageIndex:
    """Persistent index of the images in a node's data directory."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path)
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.db_path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the image index {self.db_path}: {exc}") from exc
        self.local = LocalIndex(self._load_chunks)
        self.skipped: dict[Path, str] = {}  # files sync_dir could not index, and why
        for row_id, path, blob in self._db.execute("SELECT id, path, manifest FROM images"):
            self.local.add(int(row_id), Path(path), Manifest.from_bytes(blob))

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _row(self, p: Path) -> tuple[int, StatKey] | None:
        row = self._db.execute(
            "SELECT id, size, mtime_ns, ino, dev FROM images WHERE path = ?", (str(p),)
        ).fetchone()
        return None if row is None else (int(row[0]), tuple(row[1:]))

    def update(self, path: str | os.PathLike[str]) -> Manifest:
        """Index ``path`` (again if it changed since it was indexed) and return its manifest."""
        p = Path(path).resolve()
        try:
            st = p.stat()
        except FileNotFoundError as exc:
            raise ImageError(f"image {p} not found") from exc
        row = self._row(p)
        if row is not None and row[1] == stat_key(st):
            return self.local.manifests[row[0]]
        manifest = scan_image(p)
        assert manifest.stat_key is not None  # the state the scan saw, not a later one
        self._store(p, manifest, manifest.stat_key, row)
        return manifest

    def manifest_of(self, path: str | os.PathLike[str]) -> Manifest | None:
        """The manifest of ``path`` if it is indexed and unchanged since (one ``stat``)."""
        p = Path(path).resolve()
        row = self._row(p)
        try:
            same = row is not None and row[1] == stat_key(p.stat())
        except FileNotFoundError:
            return None
        return self.local.manifests[row[0]] if same and row is not None else None

    def record(self, path: str | os.PathLike[str], manifest: Manifest) -> None:
        """Index a file known to hold ``manifest`` (a rebuilt image that was just verified).

        Saves the full re-scan that ``update`` would do on the migration's critical path.
        """
        p = Path(path).resolve()
        try:
            key = stat_key(p.stat())
        except FileNotFoundError as exc:
            raise ImageError(f"image {p} not found") from exc
        if key[0] != manifest.size:
            raise ImageError(f"image {p} is not the size its manifest says; re-index it")
        self._store(p, manifest, key, self._row(p))

    def refresh(self, paths: Iterable[str | os.PathLike[str]]) -> bool:
        """Re-index those of ``paths`` that changed (or vanished); True if any did.

        Call before trusting a plan that copies from them: one ``stat`` each when
        nothing changed.
        """
        changed = False
        for path in paths:
            p = Path(path).resolve()
            row = self._row(p)
            try:
                same = row is not None and row[1] == stat_key(p.stat())
            except FileNotFoundError:
                self.remove(p)
                changed = True
                continue
            if not same:
                self.update(p)
                changed = True
        return changed

    def _store(
        self, p: Path, manifest: Manifest, key: StatKey, row: tuple[int, StatKey] | None
    ) -> None:
        size, mtime_ns, ino, dev = key
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM images WHERE path = ?", (str(p),))
            cur = self._db.execute(
                "INSERT INTO images (path, size, mtime_ns, ino, dev, sha256, manifest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (str(p), size, mtime_ns, ino, dev, manifest.sha256, manifest.to_bytes()),
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._db.execute("ROLLBACK")
            raise StorageError(f"cannot update the image index {self.db_path}: {exc}") from exc
        if row is not None:
            self.local.remove(row[0])
        assert cur.lastrowid is not None
        self.local.add(int(cur.lastrowid), p, manifest)

    def _load_chunks(self, source: int, path: Path) -> ChunkList:
        """CDC chunks of a source from the database, computed and stored on first use."""
        row = self._db.execute("SELECT chunks FROM images WHERE id = ?", (source,)).fetchone()
        if row is not None and row[0] is not None:
            blob = bytes(row[0])
            n = len(blob) // 29
            cl = ChunkList()
            cl.offsets = array("Q", blob[: 8 * n])
            cl.lens = array("I", blob[8 * n : 12 * n])
            cl.fps = bytearray(blob[12 * n : 28 * n])
            cl.flags = bytearray(blob[28 * n :])
            return cl
        cl = chunk_file(path)
        blob = cl.offsets.tobytes() + cl.lens.tobytes() + bytes(cl.fps) + bytes(cl.flags)
        with self._db:
            self._db.execute("UPDATE images SET chunks = ? WHERE id = ?", (blob, source))
        return cl

    def remove(self, path: str | os.PathLike[str]) -> None:
        p = Path(path).resolve()
        row = self._db.execute("SELECT id FROM images WHERE path = ?", (str(p),)).fetchone()
        if row is None:
            return
        self._db.execute("DELETE FROM images WHERE id = ?", (row[0],))
        self.local.remove(int(row[0]))

    def sync_dir(self, directory: str | os.PathLike[str], *, changed: bool = True) -> None:
        """Index every regular file in ``directory``; forget indexed files that are gone.

        ``changed=False`` indexes only files not indexed yet and leaves changed ones to
        ``refresh`` (a running VM's disk changes all the time: re-reading it whenever
        something is planned would cost a full scan each time, ``refresh`` costs one
        only when a plan really copies from it).
        """
        d = Path(directory).resolve()
        present = {p.resolve() for p in d.iterdir() if p.is_file()} if d.is_dir() else set()
        known = set()
        for rec in self.images():
            if rec.path.parent == d and rec.path not in present:
                self.remove(rec.path)
            known.add(rec.path)
        for p in sorted(present):
            if not changed and p in known:
                continue
            try:
                self.update(p)
            except ImageError as exc:  # one busy or unreadable file must not stop the node
                log.warning("not indexing %s: %s", p, exc)
                self.skipped[p] = str(exc)
            else:
                self.skipped.pop(p, None)

    def images(self) -> list[ImageRecord]:
        rows = self._db.execute("SELECT path, size, sha256, mtime_ns FROM images ORDER BY path")
        return [ImageRecord(Path(p), int(s), bytes(h).hex(), int(m)) for p, s, h, m in rows]
