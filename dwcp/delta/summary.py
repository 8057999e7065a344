"""Hierarchical manifest exchange (HDE): metadata in proportion to the data and the
change, in bounded pieces.

A full manifest costs 16 bytes per non-zero 4 KiB block (4 MiB per GiB of
data). The sender first sends a summary: the tree's 1 MiB parents of the
groups that hold data (16 KiB per GiB of data; an empty 1 TiB disk costs one
entry). The receiver finds the parents it already holds in a local image,
asks for the leaves of the others only, and rebuilds the full manifest from
its own copies plus those leaves; the tree root proves the result is the
sender's. Every part of the exchange is a sequence of pieces of at most a few
hundred KiB, each processed as it arrives, so no message grows with the image.

Sans-IO: the sender describes (``SummaryHeader.of``, ``summary_parts``,
``leaves_parts``); the receiver drives a ``ManifestAssembler`` whose memory is
known from the header before anything is accepted (``memory``).
"""

from __future__ import annotations

import copy
import hashlib
import struct
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dwcp.delta import native
from dwcp.delta.index import LocalIndex
from dwcp.delta.manifest import (
    DEFAULT_MAX_IMAGE,
    Manifest,
    ManifestBuilder,
    manifest_memory,
    n_groups,
    nonzero_runs,
)
from dwcp.delta.tree import TREE_FANOUT
from dwcp.errors import ManifestError

FP = native.FP_BYTES
ENTRY = struct.Struct("<Q16s")  # group, parent
RUN = struct.Struct("<QQ")  # first group, count
_GROUP = struct.Struct("<Q")  # a leaves record: group, bitmap (bit = non-zero block), fps
PART_BYTES = 256 * 1024  # the most one piece carries
MEM_PER_ENTRY = 8 + 4 + 8  # receiver: where a found group lives, or that it is needed
_TO_BITS = bytes.maketrans(b"\x00\x01", b"10")  # flag (1 = zero) -> bit character
_TO_FLAGS = bytes.maketrans(b"10", b"\x00\x01")


def _bitmap(flags: bytes) -> bytes:
    """Bit i set when block i is non-zero (``flags[i] == 0``), little-endian bit order."""
    bits = flags.translate(_TO_BITS)[::-1]
    return int(bits, 2).to_bytes(-(-len(flags) // 8), "little") if bits else b""


def _flags(bitmap: bytes, count: int) -> tuple[bytes, int]:
    """Flags of ``count`` blocks from a bitmap, and how many are non-zero."""
    v = int.from_bytes(bitmap, "little")
    if v >> count:
        raise ManifestError("a leaves record marks blocks past its group")
    return format(v, f"0{count}b")[::-1].encode().translate(_TO_FLAGS), v.bit_count()


def with_sha256(m: Manifest, sha256: bytes) -> Manifest:
    """``m`` with its whole-image digest set (nothing recomputed)."""
    if len(sha256) != 32:
        raise ManifestError("the image digest must be 32 bytes (SHA-256)")
    out = copy.copy(m)
    object.__setattr__(out, "sha256", sha256)
    return out


@dataclass(frozen=True)
class SummaryHeader:
    """What an offer says of the manifest before its pieces follow."""

    size: int
    block_size: int
    nonzero_blocks: int
    runs: int
    entries: int  # summary entries (parents of the groups with data, and the last group)
    root: bytes

    @classmethod
    def of(cls, m: Manifest) -> SummaryHeader:
        return cls(m.size, m.block_size, m.nonzero_blocks, m.n_runs, len(m.group_ids), m.root)

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def n_groups(self) -> int:
        return n_groups(self.size, self.block_size)

    def check(self, max_image: int = DEFAULT_MAX_IMAGE) -> None:
        """Refuse a header that is impossible or over the limits (``ManifestError``)."""
        bs = self.block_size
        if bs < 512 or bs > 1 << 20 or bs & (bs - 1):
            raise ManifestError(f"manifest block size {bs} is invalid")
        if self.size > max_image:
            raise ManifestError(f"the image of {self.size} bytes is over the {max_image} limit")
        n, g = self.n_blocks, self.n_groups
        if not (
            self.nonzero_blocks <= n
            and self.runs <= self.nonzero_blocks
            and (self.runs > 0) == (self.nonzero_blocks > 0)
            and self.entries <= g
            and (self.entries > 0) == (n > 0)
            and len(self.root) == FP
        ):
            raise ManifestError("the manifest summary's counts are inconsistent")

    @property
    def memory(self) -> int:
        """Bytes a receiver holds while it assembles this manifest, and after."""
        m = manifest_memory(self.nonzero_blocks, self.runs, self.entries)
        return m + self.entries * MEM_PER_ENTRY


# --- sender ------------------------------------------------------------------------


def _chunks(records: Iterable[bytes], part_bytes: int) -> Iterator[bytes]:
    buf = bytearray()
    for r in records:
        if buf and len(buf) + len(r) > part_bytes:
            yield bytes(buf)
            buf.clear()
        buf += r
    yield bytes(buf)  # the last piece, possibly empty


def summary_parts(m: Manifest, part_bytes: int = PART_BYTES) -> Iterator[bytes]:
    """The summary's pieces: ``(group, parent)`` entries in group order."""
    ids, parents = m.group_ids, m.parents
    return _chunks(
        (ENTRY.pack(g, parents[k * FP : (k + 1) * FP]) for k, g in enumerate(ids)), part_bytes
    )


def parse_runs(data: bytes) -> list[tuple[int, int]]:
    """``(first group, count)`` runs of a NeedLeaves piece (shape only)."""
    if len(data) % RUN.size:
        raise ManifestError("a need piece is not a whole number of runs")
    return [(a, n) for a, n in RUN.iter_unpack(data)]


def need_parts(runs: Iterable[tuple[int, int]], part_bytes: int = PART_BYTES) -> Iterator[bytes]:
    return _chunks((RUN.pack(a, n) for a, n in runs), part_bytes)


def leaves_parts(
    m: Manifest, runs: Iterable[tuple[int, int]], part_bytes: int = PART_BYTES
) -> Iterator[bytes]:
    """Leaves of the requested groups: per group its bitmap and non-zero fingerprints."""
    total = n_groups(m.size, m.block_size)

    def records() -> Iterator[bytes]:
        for first, count in runs:
            if first + count > total:
                raise ManifestError("the leaf request names groups the image does not have")
            for g in range(first, first + count):
                a = g * TREE_FANOUT
                fps, flags = m.window(a, min(TREE_FANOUT, m.n_blocks - a))
                nz = b"".join(fps[i * FP : j * FP] for i, j in nonzero_runs(flags))
                yield _GROUP.pack(g) + _bitmap(flags) + nz

    return _chunks(records(), part_bytes)


# --- receiver ----------------------------------------------------------------------


class ManifestAssembler:
    """Receiver: from the summary's pieces, what to ask for; from the leaves, the manifest.

    ``header.check`` was passed and ``header.memory`` accounted for by the caller;
    every count the pieces imply is checked against the header, so a sender that
    lies cannot make the assembler hold more than it announced.
    """

    def __init__(
        self,
        header: SummaryHeader,
        index: LocalIndex,
        *,
        summary_sha256: bytes,
        max_image: int = DEFAULT_MAX_IMAGE,
    ) -> None:
        header.check(max_image)
        self.header = header
        self._index = index
        self._digest = hashlib.sha256()
        self._want_digest = summary_sha256
        self._entries = 0
        self._last_group = -1
        self.found_groups: array[int] = array("Q")
        self._found_source: array[int] = array("i")
        self._found_block: array[int] = array("Q")
        self.needed: array[int] = array("Q")
        self._next_needed = 0
        self._next_found = 0
        self._builder = ManifestBuilder(
            header.size,
            header.block_size,
            max_blocks=header.nonzero_blocks,
            max_runs=header.runs,
        )
        self.summary_done = False

    def _group_blocks(self, g: int) -> int:
        return int(min(TREE_FANOUT, self.header.n_blocks - g * TREE_FANOUT))

    def feed_summary(self, piece: bytes) -> None:
        """One piece of summary entries: look their parents up in the local index."""
        if self.summary_done or len(piece) % ENTRY.size:
            raise ManifestError("a summary piece is malformed or came after the last one")
        k = len(piece) // ENTRY.size
        if self._entries + k > self.header.entries:
            raise ManifestError("the summary lists more entries than its header announced")
        self._digest.update(piece)
        groups = [g for g, _ in ENTRY.iter_unpack(piece)]
        fps = b"".join(piece[i * ENTRY.size + 8 : (i + 1) * ENTRY.size] for i in range(k))
        total = self.header.n_groups
        found = self._index.parents.lookup(fps)
        bs = self.header.block_size
        for i, g in enumerate(groups):
            if not self._last_group < g < total:
                raise ManifestError("summary entries are out of order or past the image end")
            self._last_group = g
            src = found.sources[i]
            local = self._index.manifests.get(src) if src >= 0 else None
            first = found.offsets[i] // bs
            if (
                local is not None
                and local.block_size == bs
                and found.offsets[i] % bs == 0
                and first + self._group_blocks(g) <= local.n_blocks
            ):
                self.found_groups.append(g)
                self._found_source.append(src)
                self._found_block.append(first)
            else:
                self.needed.append(g)
        self._entries += k

    def end_summary(self) -> None:
        """The last summary piece arrived: check it is the summary the offer signed."""
        h = self.header
        if self._entries != h.entries or (h.entries and self._last_group != h.n_groups - 1):
            raise ManifestError("the summary's entries do not match its header")
        if self._digest.digest() != self._want_digest:
            raise ManifestError("the summary's pieces do not match the digest the offer signed")
        self.summary_done = True

    def needed_runs(self) -> Iterator[tuple[int, int]]:
        """The needed groups as ``(first, count)`` runs."""
        start = count = 0
        for g in self.needed:
            if count and g == start + count:
                count += 1
                continue
            if count:
                yield start, count
            start, count = g, 1
        if count:
            yield start, count

    def _copy_found(self, below: int) -> None:
        """Add the locally found groups before group ``below`` to the manifest."""
        ids = self.found_groups
        while self._next_found < len(ids) and ids[self._next_found] < below:
            j = self._next_found
            g = ids[j]
            local = self._index.manifests[self._found_source[j]]
            fps, flags = local.window(self._found_block[j], self._group_blocks(g))
            self._builder.add_dense(g * TREE_FANOUT, fps, flags)
            self._next_found += 1

    def feed_leaves(self, piece: bytes) -> None:
        """One piece of leaves records, for the needed groups in order."""
        if not self.summary_done:
            raise ManifestError("leaves arrived before the summary ended")
        mv = memoryview(piece)
        pos = 0
        while pos < len(mv):
            if self._next_needed >= len(self.needed) or pos + _GROUP.size > len(mv):
                raise ManifestError("the leaves answer groups that were not asked for")
            (g,) = _GROUP.unpack_from(mv, pos)
            if g != self.needed[self._next_needed]:
                raise ManifestError(f"leaves of group {g} arrived out of order")
            count = self._group_blocks(g)
            nbits = -(-count // 8)
            start = pos + _GROUP.size
            if start + nbits > len(mv):
                raise ManifestError("a leaves record is truncated")
            flags, nonzero = _flags(bytes(mv[start : start + nbits]), count)
            end = start + nbits + nonzero * FP
            if end > len(mv):
                raise ManifestError("a leaves record is truncated")
            self._copy_found(g)
            src, base = start + nbits, g * TREE_FANOUT
            for a, b in nonzero_runs(flags):
                self._builder.add_run(base + a, base + b, mv[src : src + (b - a) * FP])
                src += (b - a) * FP
            self._next_needed += 1
            pos = end

    def complete(self) -> Manifest:
        """Every needed group's leaves arrived: the manifest, checked against the root."""
        if self._next_needed != len(self.needed):
            raise ManifestError(
                f"leaves of {len(self.needed) - self._next_needed} requested groups are missing"
            )
        self._copy_found(self.header.n_groups)
        m = self._builder.finish(bytes(32))
        h = self.header
        if (m.nonzero_blocks, m.n_runs) != (h.nonzero_blocks, h.runs):
            raise ManifestError(
                f"the assembled manifest has {m.nonzero_blocks} non-zero blocks in {m.n_runs} "
                f"runs; the offer announced {h.nonzero_blocks} in {h.runs}"
            )
        if m.root != h.root:
            raise ManifestError(
                "the assembled manifest does not match the sender's tree root; "
                "the sender is faulty or a local image changed since it was indexed"
            )
        return m
