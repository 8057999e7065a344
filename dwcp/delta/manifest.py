"""Image manifests (HDE): what an image holds, block by block, in memory that grows with
its data, not its size.

A manifest lists the runs of non-zero aligned blocks (4 KiB by default) and a
16-byte XXH3-128 fingerprint per non-zero block; zero blocks cost nothing, so
a 1 TiB sparse disk holding 4 GiB costs 16 MiB. Above the blocks sits a hash
tree (1 MiB parents, then 256 MiB, ...) whose root names the content; it is
computed sparsely (a subtree of zero blocks has a known value per level) and
is the same tree as the dense one a zero fingerprint per zero block would give.
The whole image's SHA-256 (equal to ``sha256sum``) guarantees that a
fingerprint collision can never silently produce a wrong image.

``ManifestBuilder`` assembles a manifest in block order from dense windows
(a scan) or runs (a receiver); its caps bound what a hostile description can
make it hold.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import struct
import threading
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zstandard

from dwcp.delta import native
from dwcp.delta.reader import ImageReader, StatKey
from dwcp.delta.tree import TREE_FANOUT, sparse_tree
from dwcp.errors import ImageError, ManifestError

BLOCK_SIZE = 4096
FP = native.FP_BYTES
MAGIC_V1 = b"DWCPMAN\x01"  # dense block map (read for indexes written by older versions)
MAGIC = b"DWCPMAN\x02"  # runs of non-zero blocks
# Largest image a decoded manifest may describe unless the caller allows more.
DEFAULT_MAX_IMAGE = 4 << 40
SCAN_WINDOW = 8 << 20
_NONZERO_RUN = re.compile(b"\\x00+")

_HEADER_V1 = struct.Struct("<8sHHIQQ32s16sI")  # magic ver flags bs size nonzero sha root flags_len
_HEADER = struct.Struct("<8sIQQQ32s16sI")  # magic bs size nonzero runs sha root runs_len
_ZERO_WINDOW = memoryview(bytes(SCAN_WINDOW))

# Bytes of memory a manifest costs: per non-zero block, per run, per tree parent.
MEM_PER_BLOCK = FP
MEM_PER_RUN = 16 + 8
MEM_PER_PARENT = 8 + FP


def manifest_memory(nonzero_blocks: int, runs: int, parents: int) -> int:
    """Memory a manifest of these counts holds (what a receiver accounts for)."""
    return nonzero_blocks * MEM_PER_BLOCK + runs * MEM_PER_RUN + parents * MEM_PER_PARENT


def n_groups(size: int, block_size: int) -> int:
    """Tree parents (1 MiB groups at 4 KiB blocks) of an image."""
    blocks = -(-size // block_size)
    return -(-blocks // TREE_FANOUT)


@dataclass(frozen=True)
class Manifest:
    """Runs of non-zero blocks, their fingerprints and the image digest; validated."""

    size: int
    block_size: int
    sha256: bytes
    runs: array[int] = field(repr=False)  # flat [start, end) block pairs, sorted, apart
    fps: bytes = field(repr=False)  # one fingerprint per non-zero block, in block order
    # The file state (size, mtime, inode, device) a scan saw; None when decoded.
    stat_key: StatKey | None = field(repr=False, default=None, compare=False)
    # Derived: run -> fingerprints before it; the sparse 1 MiB parents (every parent
    # with a non-zero block, and the last); the tree root.
    cum: array[int] = field(init=False, repr=False, compare=False)
    group_ids: array[int] = field(init=False, repr=False, compare=False)
    parents: bytes = field(init=False, repr=False, compare=False)
    root: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bs = self.block_size
        if bs <= 0 or bs & (bs - 1):
            raise ManifestError(f"block size {bs} is not a power of two")
        if len(self.sha256) != 32:
            raise ManifestError("the image digest must be 32 bytes (SHA-256)")
        n = -(-self.size // bs)
        runs = self.runs
        if len(runs) % 2:
            raise ManifestError("manifest runs must be (start, end) pairs")
        cum = array("Q")
        total, end = 0, -1
        for j in range(0, len(runs), 2):
            a, b = runs[j], runs[j + 1]
            if a >= b or b > n or (j and a <= end):
                raise ManifestError(
                    f"manifest run {j // 2} ({a}..{b}) is empty, out of order or past "
                    f"the {n}-block image"
                )
            cum.append(total)
            total += b - a
            end = b
        if len(self.fps) != total * FP:
            raise ManifestError(
                f"manifest lists {total} non-zero blocks and {len(self.fps) // FP} fingerprints"
            )
        object.__setattr__(self, "cum", cum)
        ids, values, root = sparse_tree(n, self.iter_runs(), self.fps)
        object.__setattr__(self, "group_ids", ids)
        object.__setattr__(self, "parents", values)
        object.__setattr__(self, "root", root)

    # --- blocks -----------------------------------------------------------------------

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def nonzero_blocks(self) -> int:
        return len(self.fps) // FP

    @property
    def n_runs(self) -> int:
        return len(self.runs) // 2

    @property
    def zero_blocks(self) -> int:
        return self.n_blocks - self.nonzero_blocks

    @property
    def bytes_zero(self) -> int:
        """Zero bytes in whole zero blocks (the short last block counts its real size)."""
        zeros = self.zero_blocks
        n, bs = self.n_blocks, self.block_size
        last_zero = n > 0 and not (self.runs and self.runs[-1] == n)
        if zeros and last_zero and self.size % bs:
            return (zeros - 1) * bs + self.size % bs
        return zeros * bs

    @property
    def memory(self) -> int:
        """Bytes this manifest holds (see ``manifest_memory``)."""
        return manifest_memory(self.nonzero_blocks, self.n_runs, len(self.group_ids))

    def block_len(self, i: int) -> int:
        return min(self.block_size, self.size - i * self.block_size)

    def iter_runs(self) -> Iterator[tuple[int, int, int]]:
        """(start, end, index of the first's fingerprint) of every run of non-zero blocks."""
        runs, cum = self.runs, self.cum
        for j in range(len(cum)):
            yield runs[2 * j], runs[2 * j + 1], cum[j]

    def window(self, first: int, count: int) -> tuple[bytes, bytes]:
        """Dense fingerprints and flags (``FLAG_ZERO``) of blocks ``first..first+count``."""
        fps = bytearray(count * FP)
        flags = bytearray(b"\x01" * count)
        end = first + count
        runs = self.runs
        j = max(bisect.bisect_right(self.runs_starts, first) - 1, 0)
        while j < len(self.cum) and runs[2 * j] < end:
            a, b = max(runs[2 * j], first), min(runs[2 * j + 1], end)
            if a < b:
                src = (self.cum[j] + a - runs[2 * j]) * FP
                fps[(a - first) * FP : (b - first) * FP] = self.fps[src : src + (b - a) * FP]
                flags[a - first : b - first] = bytes(b - a)
            j += 1
        return bytes(fps), bytes(flags)

    @property
    def runs_starts(self) -> array[int]:
        starts = getattr(self, "_starts", None)
        if starts is None:
            starts = array("Q", self.runs[0::2])
            object.__setattr__(self, "_starts", starts)
        return starts

    def dense(self) -> tuple[bytes, bytes]:
        """Fingerprints and flags of every block (small images and tests only)."""
        return self.window(0, self.n_blocks)

    @classmethod
    def from_dense(
        cls, size: int, block_size: int, sha256: bytes, fps: bytes, flags: bytes
    ) -> Manifest:
        """From one fingerprint and one flag per block (``native.block_fingerprints``)."""
        n = -(-size // block_size)
        if len(flags) != n or len(fps) != n * FP:
            raise ManifestError(
                f"a {size}-byte image has {n} blocks; got {len(flags)} flags and "
                f"{len(fps) // FP} fingerprints"
            )
        b = ManifestBuilder(size, block_size)
        b.add_dense(0, fps, flags)
        return b.finish(sha256)

    # --- encoding ----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Compact form: header, zstd-compressed runs (as gaps and lengths), fingerprints."""
        deltas = array("Q")
        prev = 0
        for a, b, _ in self.iter_runs():
            deltas.append(a - prev)
            deltas.append(b - a)
            prev = b
        packed = zstandard.ZstdCompressor(level=3).compress(deltas.tobytes())
        header = _HEADER.pack(
            MAGIC,
            self.block_size,
            self.size,
            self.nonzero_blocks,
            self.n_runs,
            self.sha256,
            self.root,
            len(packed),
        )
        return header + packed + self.fps

    @classmethod
    def from_bytes(cls, data: bytes, *, max_image: int = DEFAULT_MAX_IMAGE) -> Manifest:
        """Decode and check a manifest; any inconsistency raises ``ManifestError``."""
        if data[:8] == MAGIC_V1:
            return _from_bytes_v1(data, max_image)
        if len(data) < _HEADER.size:
            raise ManifestError(f"manifest truncated: {len(data)} bytes")
        magic, bs, size, nonzero, n_runs, sha, root, runs_len = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ManifestError("not a dwcp manifest (bad magic)")
        _check_header(bs, size, max_image)
        n = -(-size // bs)
        body = _HEADER.size + runs_len
        if nonzero > n or n_runs > nonzero or len(data) != body + nonzero * FP:
            raise ManifestError(
                f"manifest length {len(data)} does not match its header "
                f"({n} blocks, {nonzero} fingerprints)"
            )
        packed = data[_HEADER.size : body]
        try:
            want = 16 * n_runs
            # zstd allocates what a frame declares, whatever max_output_size says.
            if zstandard.frame_content_size(packed) != want:
                raise ManifestError("manifest runs declare the wrong size")
            raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=want)
        except zstandard.ZstdError as exc:
            raise ManifestError(f"manifest runs are corrupt: {exc}") from exc
        if len(raw) != want:
            raise ManifestError("manifest runs are corrupt")
        deltas = array("Q", raw)
        runs = array("Q")
        pos = 0
        for j in range(0, len(deltas), 2):
            a = pos + deltas[j]
            pos = a + deltas[j + 1]
            if pos > n:
                raise ManifestError("manifest runs pass the end of the image")
            runs.append(a)
            runs.append(pos)
        m = cls(size, bs, bytes(sha), runs, bytes(data[body:]))
        if m.root != root:
            raise ManifestError("manifest hash-tree root does not match its fingerprints")
        return m


def _check_header(bs: int, size: int, max_image: int) -> None:
    if bs < 512 or bs > 1 << 20 or bs & (bs - 1):
        raise ManifestError(f"manifest block size {bs} is invalid")
    if size > max_image:
        raise ManifestError(f"manifest describes a {size}-byte image, over the {max_image} limit")


def _from_bytes_v1(data: bytes, max_image: int) -> Manifest:
    """The dense format of index databases written by dwcp before manifests were sparse."""
    if len(data) < _HEADER_V1.size:
        raise ManifestError(f"manifest truncated: {len(data)} bytes")
    _m, version, _f, bs, size, count, sha, root, flags_len = _HEADER_V1.unpack_from(data)
    if version != 1:
        raise ManifestError(f"manifest version {version} is not supported")
    _check_header(bs, size, max_image)
    n = -(-size // bs)
    body = _HEADER_V1.size + flags_len
    if count > n or len(data) != body + count * FP:
        raise ManifestError(f"manifest length {len(data)} does not match its header")
    try:
        packed = data[_HEADER_V1.size : body]
        if n and zstandard.frame_content_size(packed) != n:
            raise ManifestError("manifest block map declares the wrong size")
        flags = zstandard.ZstdDecompressor().decompress(packed, max_output_size=n) if n else b""
    except zstandard.ZstdError as exc:
        raise ManifestError(f"manifest block map is corrupt: {exc}") from exc
    if len(flags) != n or flags.translate(None, b"\x00\x01"):
        raise ManifestError("manifest block map is corrupt")
    if n - flags.count(native.FLAG_ZERO) != count:
        raise ManifestError("manifest block map and fingerprint count disagree")
    b = ManifestBuilder(size, bs)
    j = 0
    src = memoryview(data)[body:]
    for a, e in nonzero_runs(flags):
        b.add_run(a, e, bytes(src[j : j + (e - a) * FP]))
        j += (e - a) * FP
    m = b.finish(bytes(sha))
    if m.root != root:
        raise ManifestError("manifest hash-tree root does not match its fingerprints")
    return m


def nonzero_runs(flags: bytes | memoryview) -> list[tuple[int, int]]:
    """Block ranges [a, b) of non-zero blocks (runs, not blocks, keep Python cheap)."""
    return [m.span() for m in _NONZERO_RUN.finditer(flags)]


class ManifestBuilder:
    """Builds a manifest in block order; refuses more than ``max_blocks`` / ``max_runs``."""

    def __init__(
        self,
        size: int,
        block_size: int,
        *,
        max_blocks: int | None = None,
        max_runs: int | None = None,
    ) -> None:
        self.size, self.block_size = size, block_size
        self.n_blocks = -(-size // block_size)
        self.runs: array[int] = array("Q")
        self.fps = bytearray()
        self.max_blocks = self.n_blocks if max_blocks is None else max_blocks
        self.max_runs = self.n_blocks if max_runs is None else max_runs
        self.pos = 0  # every block before this one is decided

    def add_dense(self, first: int, fps: bytes | memoryview, flags: bytes | memoryview) -> None:
        """Blocks ``first..first+len(flags)`` as one fingerprint and flag each."""
        for a, b in nonzero_runs(flags):
            self.add_run(first + a, first + b, fps[a * FP : b * FP])

    def add_run(self, a: int, b: int, fps: bytes | memoryview) -> None:
        """Non-zero blocks ``a..b`` (not before what was added already)."""
        if not self.pos <= a < b <= self.n_blocks or len(fps) != (b - a) * FP:
            raise ManifestError(f"blocks {a}..{b} are out of order or past the image end")
        if len(self.fps) // FP + b - a > self.max_blocks:
            raise ManifestError(
                f"the manifest holds more than the {self.max_blocks} non-zero blocks announced"
            )
        if self.runs and self.runs[-1] == a:
            self.runs[-1] = b
        else:
            if len(self.runs) // 2 >= self.max_runs:
                raise ManifestError(
                    f"the manifest holds more than the {self.max_runs} runs announced"
                )
            self.runs.append(a)
            self.runs.append(b)
        self.fps += fps
        self.pos = b

    def skip_to(self, block: int) -> None:
        """Blocks before ``block`` not added yet are zero."""
        if block < self.pos:
            raise ManifestError(f"block {block} was already decided")
        self.pos = block

    def finish(self, sha256: bytes, stat_key: StatKey | None = None) -> Manifest:
        fps, self.fps = bytes(self.fps), bytearray()
        return Manifest(self.size, self.block_size, sha256, self.runs, fps, stat_key)


def scan_image(
    path: str | os.PathLike[str], *, block_size: int = BLOCK_SIZE, digest: bool = True
) -> Manifest:
    """Fingerprint an image, reading it once; refuse it if it changes meanwhile.

    Windows inside holes are neither read nor fingerprinted (they are zero). SHA-256
    of each window runs in a second thread while C fingerprints the same window
    (both release the GIL), so the scan costs about one SHA-256 pass; ``digest=False``
    skips it (all-zero ``sha256``) where only the blocks matter. The returned
    manifest's ``stat_key`` is the file state it describes.
    """
    with ImageReader(path) as r:
        size = r.size
        sha = hashlib.sha256()
        builder = ManifestBuilder(size, block_size)
        buf = memoryview(bytearray(min(SCAN_WINDOW, size)))
        with ThreadPoolExecutor(max_workers=1) as pool:
            for off in range(0, size, SCAN_WINDOW):
                n = min(SCAN_WINDOW, size - off)
                if r.is_hole(off, n):
                    if digest:
                        sha.update(_ZERO_WINDOW[:n])
                    continue
                view = buf[:n]
                r.read_into(view, off)
                hashing = pool.submit(sha.update, view) if digest else None
                f_, fl, _ = native.block_fingerprints(view, block_size)
                builder.add_dense(off // block_size, f_, fl)
                if hashing is not None:
                    hashing.result()
        r.check_unchanged()
        key = r.key
    return builder.finish(sha.digest() if digest else bytes(32), key)


def content_id(m: Manifest) -> bytes:
    """Names the content as soon as it is fingerprinted: SHA-256 of the image's size,
    block size, non-zero block count and hash-tree root (which commits to every block)."""
    return content_id_of(m.size, m.block_size, m.nonzero_blocks, m.root)


def content_id_of(size: int, block_size: int, nonzero_blocks: int, root: bytes) -> bytes:
    """``content_id`` from a manifest's description (what a receiver checks an offer by)."""
    h = hashlib.sha256(b"dwcp-content-v2\x00")
    h.update(struct.pack("<QIQ", size, block_size, nonzero_blocks))
    h.update(root)
    return h.digest()


def image_sha256(
    path: str | os.PathLike[str],
    expect: StatKey | None = None,
    stop: threading.Event | None = None,
) -> bytes:
    """SHA-256 of an image (holes hashed from memory); ``ImageError`` if it is not the
    file state ``expect`` (a manifest's ``stat_key``) or changes while it is read.

    Setting ``stop`` ends the pass early (``ImageError``): a transfer that failed
    must not leave a thread reading the rest of a large image.
    """
    with ImageReader(path) as r:
        if expect is not None and r.key != expect:
            raise r.changed()
        sha = hashlib.sha256()
        buf = memoryview(bytearray(min(SCAN_WINDOW, r.size)))
        for off in range(0, r.size, SCAN_WINDOW):
            if stop is not None and stop.is_set():
                raise ImageError(f"hashing {path} was stopped")
            n = min(SCAN_WINDOW, r.size - off)
            if r.is_hole(off, n):
                sha.update(_ZERO_WINDOW[:n])
                continue
            view = buf[:n]
            r.read_into(view, off)
            sha.update(view)
        r.check_unchanged()
    return sha.digest()
