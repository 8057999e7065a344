"""Checked wrappers around the C hot path ``dwcp._hde`` (HDE).

Every function takes a whole buffer and returns Python ``bytes``/``array``
objects; no cdata leaves this module, and every C return code is checked.
"""

from __future__ import annotations

import mmap
from array import array
from dataclasses import dataclass
from typing import Any

from dwcp._hde import ffi, lib

Buffer = bytes | bytearray | memoryview | mmap.mmap

FP_BYTES: int = lib.HDE_FP_BYTES
FLAG_ZERO: int = lib.HDE_FLAG_ZERO
KIND_ZERO: int = lib.HDE_KIND_ZERO
KIND_COPY: int = lib.HDE_KIND_COPY
KIND_LITERAL: int = lib.HDE_KIND_LITERAL

# Gear CDC sizes: ~16 KiB average, chunks between 4 KiB and 64 KiB (one mask, see hde.c).
CDC_MIN = 4 * 1024
CDC_AVG = 16 * 1024
CDC_MAX = 64 * 1024

if lib.hde_abi() != 1:  # pragma: no cover - a stale build
    raise ImportError("dwcp._hde is out of date; rebuild with 'pip install -e .'")


def _ptr(buf: Buffer) -> Any:
    return ffi.from_buffer("uint8_t[]", buf)


def _array_ptr(ctype: str, a: array[Any]) -> Any:
    return ffi.cast(ctype, ffi.from_buffer(a))


def block_fingerprints(buf: Buffer, block_size: int) -> tuple[bytes, bytes, int]:
    """Fingerprint aligned blocks: (fps, flags, zero block count)."""
    length = memoryview(buf).nbytes
    n = -(-length // block_size)
    fps = bytearray(n * FP_BYTES)
    flags = bytearray(n)
    zeros = lib.hde_blocks(_ptr(buf), length, block_size, _ptr(fps), _ptr(flags))
    if zeros < 0:
        raise ValueError(f"invalid block size {block_size}")
    return bytes(fps), bytes(flags), int(zeros)


def tree_level(fps: bytes, fanout: int) -> bytes:
    """One hash-tree level above ``fps`` (each parent hashes ``fanout`` children)."""
    n = len(fps) // FP_BYTES
    np_ = -(-n // fanout) if n else 0
    out = bytearray(np_ * FP_BYTES)
    if n:
        lib.hde_tree_level(fps, n, fanout, _ptr(out))
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Chunks:
    """CDC chunks of one buffer: parallel arrays (``lens`` in bytes)."""

    lens: array[int]
    fps: bytes
    flags: bytes
    consumed: int


def cdc_chunks(buf: Buffer, *, final: bool) -> Chunks:
    """Cut ``buf`` into content-defined chunks; without ``final`` the tail is left."""
    length = memoryview(buf).nbytes
    cap = length // CDC_MIN + 2
    lens = array("I", bytes(4 * cap))
    fps = bytearray(cap * FP_BYTES)
    flags = bytearray(cap)
    consumed = ffi.new("size_t *")
    k = lib.hde_cdc(
        _ptr(buf),
        length,
        CDC_MIN,
        CDC_AVG,
        CDC_MAX,
        1 if final else 0,
        _array_ptr("uint32_t *", lens),
        _ptr(fps),
        _ptr(flags),
        cap,
        consumed,
    )
    if k < 0:
        raise ValueError("invalid CDC sizes")
    del lens[k:]
    return Chunks(lens, bytes(fps[: k * FP_BYTES]), bytes(flags[:k]), int(consumed[0]))


@dataclass(frozen=True, slots=True)
class Lookup:
    """Results of a batch lookup: ``sources[i] == -1`` is a miss."""

    sources: array[int]
    offsets: array[int]
    lens: array[int]
    hits: int


@dataclass(frozen=True, slots=True)
class Extents:
    """Runs of blocks: ``start``/``count`` in blocks, ``kind`` KIND_*."""

    start: array[int]
    count: array[int]
    kind: bytes
    source: array[int]
    offset: array[int]

    def __len__(self) -> int:
        return len(self.kind)


class FingerprintIndex:
    """Fingerprint -> (source id, offset, length), a C open-addressing table.

    The first location added for a fingerprint wins, so adding an image twice
    is harmless. Zero blocks are never indexed.
    """

    def __init__(self, capacity_hint: int = 1024) -> None:
        ptr = lib.hde_index_new(capacity_hint)
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate the fingerprint index")
        self._ptr = ffi.gc(ptr, lib.hde_index_free)

    def __len__(self) -> int:
        return int(lib.hde_index_count(self._ptr))

    def add_blocks(
        self, fps: bytes, flags: bytes | None, source: int, block_size: int, base: int = 0
    ) -> int:
        """Index aligned blocks of one image (block i at ``base + i * block_size``);
        ``flags=None``: every block is non-zero."""
        n = self._sized(fps, flags) if flags is not None else len(fps) // FP_BYTES
        added = lib.hde_index_add(
            self._ptr,
            fps,
            flags if flags is not None else ffi.NULL,
            n,
            source,
            ffi.NULL,
            base,
            block_size,
            ffi.NULL,
        )
        return self._checked(added)

    def add_chunks(
        self, fps: bytes, flags: bytes, offsets: array[int], lens: array[int], source: int
    ) -> int:
        """Index CDC chunks of one image at the given offsets and lengths."""
        n = self._sized(fps, flags)
        if len(offsets) < n or len(lens) < n:
            raise ValueError("offsets and lens must list every chunk")
        added = lib.hde_index_add(
            self._ptr,
            fps,
            flags,
            n,
            source,
            _array_ptr("uint64_t *", offsets),
            0,
            0,
            _array_ptr("uint32_t *", lens),
        )
        return self._checked(added)

    def remove_source(self, source: int) -> int:
        return self._checked(lib.hde_index_remove_source(self._ptr, source))

    def lookup(self, fps: bytes, flags: bytes | None = None) -> Lookup:
        """Where each fingerprint lives; ``flags=None``: look every one up."""
        n = self._sized(fps, flags) if flags is not None else len(fps) // FP_BYTES
        sources = array("i", bytes(4 * n))
        offsets = array("Q", bytes(8 * n))
        lens = array("I", bytes(4 * n))
        hits = lib.hde_index_lookup(
            self._ptr,
            fps,
            flags if flags is not None else ffi.NULL,
            n,
            _array_ptr("int32_t *", sources),
            _array_ptr("uint64_t *", offsets),
            _array_ptr("uint32_t *", lens),
        )
        return Lookup(sources, offsets, lens, int(hits))

    @staticmethod
    def _sized(fps: bytes, flags: bytes) -> int:
        """Entry count, refusing arrays C would read past the end of."""
        n = len(flags)
        if len(fps) < n * FP_BYTES:
            raise ValueError(f"{len(fps)} fingerprint bytes for {n} entries")
        return n

    @staticmethod
    def _checked(rc: int) -> int:
        if rc < 0:
            raise MemoryError("out of memory while growing the fingerprint index")
        return int(rc)


def extents(flags: bytes, found: Lookup, block_size: int) -> Extents:
    """Merge per-block lookup results into zero / copy / literal runs of blocks."""
    n = len(flags)
    if len(found.sources) < n or len(found.offsets) < n:
        raise ValueError("lookup results must cover every block")
    cap = max(n, 1)
    start = array("Q", bytes(8 * cap))
    count = array("Q", bytes(8 * cap))
    kind = bytearray(cap)
    source = array("i", bytes(4 * cap))
    offset = array("Q", bytes(8 * cap))
    e = lib.hde_extents(
        n,
        block_size,
        flags,
        _array_ptr("int32_t *", found.sources),
        _array_ptr("uint64_t *", found.offsets),
        _array_ptr("uint64_t *", start),
        _array_ptr("uint64_t *", count),
        _ptr(kind),
        _array_ptr("int32_t *", source),
        _array_ptr("uint64_t *", offset),
        cap,
    )
    if e < 0:  # pragma: no cover - cap >= n always suffices
        raise RuntimeError("extent buffer too small")
    for a in (start, count, source, offset):
        del a[e:]
    return Extents(start, count, bytes(kind[:e]), source, offset)
