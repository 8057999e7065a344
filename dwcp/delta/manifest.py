"""Image manifests (HDE): what an image holds, block by block, in compact binary.

A manifest lists a 16-byte XXH3-128 fingerprint per aligned 4 KiB block (zero
blocks are flagged, not hashed), a hash tree over them (1 MiB parents, then
256 MiB, ...), and the SHA-256 of the whole image. XXH3 finds what the receiver
already has; SHA-256 (equal to ``sha256sum``) guarantees that a fingerprint
collision can never silently produce a wrong image.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zstandard

from dwcp.delta import native
from dwcp.delta.reader import ImageReader, StatKey
from dwcp.errors import ImageError, ManifestError

BLOCK_SIZE = 4096
TREE_FANOUT = 256
MANIFEST_VERSION = 1
MAGIC = b"DWCPMAN\x01"
# Largest image a decoded manifest may describe unless the caller allows more
# (4 TiB: 1 Gi blocks, so at most 1 GiB of flags in memory).
DEFAULT_MAX_IMAGE = 4 << 40
SCAN_WINDOW = 8 << 20
_NONZERO_RUN = re.compile(b"\\x00+")

_HEADER = struct.Struct("<8sHHIQQ32s16sI")  # magic ver flags bs size nonzero sha root flags_len


def _tree(fps: bytes) -> list[bytes]:
    """Levels above the leaves, bottom-up; the last level has one node, the root."""
    levels: list[bytes] = []
    level = fps
    while True:
        level = native.tree_level(level, TREE_FANOUT) if level else b""
        if not level:
            level = hashlib.blake2b(b"dwcp-empty-tree", digest_size=16).digest()
        levels.append(level)
        if len(level) <= native.FP_BYTES:
            return levels


@dataclass(frozen=True)
class Manifest:
    """Fingerprints and digest of one image; validated on construction."""

    size: int
    block_size: int
    sha256: bytes
    fps: bytes = field(repr=False)
    flags: bytes = field(repr=False)
    levels: tuple[bytes, ...] = field(repr=False, default=())
    # The file state (size, mtime, inode, device) a scan saw; None when decoded.
    stat_key: StatKey | None = field(repr=False, default=None, compare=False)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ManifestError(f"block size {self.block_size} is not a power of two")
        n = -(-self.size // self.block_size)
        if len(self.flags) != n or len(self.fps) != n * native.FP_BYTES:
            raise ManifestError(
                f"manifest of a {self.size}-byte image must list {n} blocks, "
                f"has {len(self.flags)} flags and {len(self.fps) // native.FP_BYTES} fingerprints"
            )
        if len(self.sha256) != 32:
            raise ManifestError("the image digest must be 32 bytes (SHA-256)")
        if not self.levels:
            object.__setattr__(self, "levels", tuple(_tree(self.fps)))

    @property
    def n_blocks(self) -> int:
        return len(self.flags)

    @property
    def root(self) -> bytes:
        return self.levels[-1]

    @property
    def zero_blocks(self) -> int:
        return self.flags.count(native.FLAG_ZERO)

    @property
    def bytes_zero(self) -> int:
        """Zero bytes in whole zero blocks (the short last block counts its real size)."""
        zeros = self.zero_blocks
        if zeros and self.flags[-1] & native.FLAG_ZERO and self.size % self.block_size:
            return (zeros - 1) * self.block_size + self.size % self.block_size
        return zeros * self.block_size

    def block_len(self, i: int) -> int:
        return min(self.block_size, self.size - i * self.block_size)

    # --- encoding ----------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Compact form: header, zstd-compressed flags, fingerprints of non-zero blocks."""
        packed_flags = zstandard.ZstdCompressor(level=3).compress(self.flags)
        fp = native.FP_BYTES
        mv = memoryview(self.fps)
        nonzero = b"".join(mv[a * fp : b * fp] for a, b in _nonzero_runs(self.flags))
        count = len(nonzero) // fp
        header = _HEADER.pack(
            MAGIC,
            MANIFEST_VERSION,
            0,
            self.block_size,
            self.size,
            count,
            self.sha256,
            self.root,
            len(packed_flags),
        )
        return header + packed_flags + bytes(nonzero)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_image: int = DEFAULT_MAX_IMAGE) -> Manifest:
        """Decode and check a manifest; any inconsistency raises ``ManifestError``."""
        if len(data) < _HEADER.size:
            raise ManifestError(
                f"manifest truncated: {len(data)} bytes, header needs {_HEADER.size}"
            )
        magic, version, _flags, bs, size, count, sha, root, flags_len = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ManifestError("not a dwcp manifest (bad magic)")
        if version != MANIFEST_VERSION:
            raise ManifestError(f"manifest version {version} is not supported (expected 1)")
        if bs < 512 or bs > 1 << 20 or bs & (bs - 1):
            raise ManifestError(f"manifest block size {bs} is invalid")
        if size > max_image:
            raise ManifestError(
                f"manifest describes a {size}-byte image, over the {max_image} limit"
            )
        n = -(-size // bs)
        fp = native.FP_BYTES
        body = _HEADER.size + flags_len
        if count > n or len(data) != body + count * fp:
            raise ManifestError(
                f"manifest length {len(data)} does not match its header "
                f"({n} blocks, {count} fingerprints)"
            )
        try:
            packed = data[_HEADER.size : body]
            # zstd allocates what a frame declares, whatever max_output_size says.
            if n and zstandard.frame_content_size(packed) != n:
                raise ManifestError("manifest block map declares the wrong size")
            dctx = zstandard.ZstdDecompressor()
            flags = dctx.decompress(packed, max_output_size=n) if n else b""
        except zstandard.ZstdError as exc:
            raise ManifestError(f"manifest block map is corrupt: {exc}") from exc
        if len(flags) != n or flags.translate(None, b"\x00\x01"):
            raise ManifestError("manifest block map is corrupt")
        if n - flags.count(native.FLAG_ZERO) != count:
            raise ManifestError("manifest block map and fingerprint count disagree")
        fps = bytearray(n * fp)
        src = memoryview(data)[body:]
        j = 0
        for a, b in _nonzero_runs(flags):
            fps[a * fp : b * fp] = src[j : j + (b - a) * fp]
            j += (b - a) * fp
        m = cls(size=size, block_size=bs, sha256=bytes(sha), fps=bytes(fps), flags=flags)
        if m.root != root:
            raise ManifestError("manifest hash-tree root does not match its fingerprints")
        return m


def _nonzero_runs(flags: bytes) -> list[tuple[int, int]]:
    """Block ranges [a, b) of non-zero blocks (runs, not blocks, keep Python cheap)."""
    return [m.span() for m in _NONZERO_RUN.finditer(flags)]


def scan_image(
    path: str | os.PathLike[str], *, block_size: int = BLOCK_SIZE, digest: bool = True
) -> Manifest:
    """Fingerprint an image, reading it once; refuse it if it changes meanwhile.

    SHA-256 of each window runs in a second thread while C fingerprints the
    same window (both release the GIL), so the scan costs about one SHA-256
    pass. ``digest=False`` skips it (all-zero ``sha256``) where only the blocks
    matter. The returned manifest's ``stat_key`` is the file state it describes.
    """
    with ImageReader(path) as r:
        size = r.size
        sha = hashlib.sha256()
        fps = bytearray()
        flags = bytearray()
        buf = memoryview(bytearray(min(SCAN_WINDOW, size)))
        with ThreadPoolExecutor(max_workers=1) as pool:
            for off in range(0, size, SCAN_WINDOW):
                view = buf[: min(SCAN_WINDOW, size - off)]
                r.read_into(view, off)
                hashing = pool.submit(sha.update, view) if digest else None
                f_, fl, _ = native.block_fingerprints(view, block_size)
                fps += f_
                flags += fl
                if hashing is not None:
                    hashing.result()
        r.check_unchanged()
        key = r.key
    m = Manifest(size, block_size, sha.digest() if digest else bytes(32), bytes(fps), bytes(flags))
    object.__setattr__(m, "stat_key", key)
    return m


def content_id(m: Manifest) -> bytes:
    """SHA-256 of the image's size, block size, block flags and fingerprints.

    Names the content as soon as it is fingerprinted (a thousandth of the image's
    bytes to hash), so a transfer can start before the whole-image SHA-256 is known.
    """
    h = hashlib.sha256(b"dwcp-content-v1\x00")
    h.update(struct.pack("<QI", m.size, m.block_size))
    h.update(m.flags)
    h.update(m.fps)
    return h.digest()


def image_sha256(
    path: str | os.PathLike[str],
    expect: StatKey | None = None,
    stop: threading.Event | None = None,
) -> bytes:
    """SHA-256 of an image (holes from memory); ``ImageError`` if it is not the file
    state ``expect`` (a manifest's ``stat_key``) or changes while it is read.

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
            view = buf[: min(SCAN_WINDOW, r.size - off)]
            r.read_into(view, off)
            sha.update(view)
        r.check_unchanged()
    return sha.digest()
