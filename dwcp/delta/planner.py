"""Plans (HDE): which bytes of a new image are zero, already local, or missing.

``plan`` matches aligned 4 KiB blocks through the C index in one call; the
receiver then asks the sender for ``Plan.missing`` only. Long missing runs may
be data that moved to an unaligned offset: the sender's ``chunk_list`` of CDC
fingerprints around them lets ``refine`` find that data locally too.
"""

from __future__ import annotations

import itertools
import os
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from dwcp.delta import native
from dwcp.delta.chunking import chunk_file
from dwcp.delta.index import LocalIndex
from dwcp.delta.manifest import Manifest
from dwcp.errors import ManifestError

ZERO = "zero"
COPY = "copy"
MISSING = "missing"

# Missing runs shorter than this are left to aligned matching: a CDC chunk (4 KiB
# minimum) cannot match inside them anyway.
REFINE_MIN_RUN = 32 * 1024
PLAN_WINDOW = 1 << 16  # blocks looked up per C call
MAX_CHUNK_LIST = 64 << 20

_KINDS = {native.KIND_ZERO: ZERO, native.KIND_COPY: COPY, native.KIND_LITERAL: MISSING}
_ENTRY = struct.Struct("<QI16s")


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes at image ``offset``: zero, copied from a local source, or missing."""

    offset: int
    length: int
    kind: str
    source: int = -1
    source_offset: int = 0


@dataclass
class Plan:
    """How to rebuild an image of ``size`` bytes from zeros, local data and missing ranges."""

    size: int
    extents: list[Extent] = field(default_factory=list)
    paths: dict[int, Path] = field(default_factory=dict)

    @property
    def missing(self) -> list[tuple[int, int]]:
        return [(e.offset, e.length) for e in self.extents if e.kind == MISSING]

    def _bytes(self, kind: str) -> int:
        return sum(e.length for e in self.extents if e.kind == kind)

    @property
    def bytes_missing(self) -> int:
        return self._bytes(MISSING)

    @property
    def bytes_local(self) -> int:
        return self._bytes(COPY)

    @property
    def bytes_zero(self) -> int:
        return self._bytes(ZERO)


def _append(out: Plan, e: Extent) -> None:
    """Add ``e`` after the plan's last extent, merging the two when they continue."""
    if out.extents:
        last = out.extents[-1]
        if (
            last.kind == e.kind
            and last.offset + last.length == e.offset
            and (
                e.kind != COPY
                or (last.source == e.source and last.source_offset + last.length == e.source_offset)
            )
        ):
            out.extents[-1] = Extent(
                last.offset, last.length + e.length, e.kind, last.source, last.source_offset
            )
            return
    out.extents.append(e)


def plan(manifest: Manifest, index: LocalIndex) -> Plan:
    """Match every non-zero block of ``manifest`` against the local index.

    Runs of non-zero blocks are looked up in windows of ``PLAN_WINDOW`` blocks
    (one C call each), so the temporaries stay small whatever the image's size.
    """
    bs, size, fp = manifest.block_size, manifest.size, native.FP_BYTES
    out = Plan(size)
    pos = 0  # bytes decided so far
    for a, b, at in manifest.iter_runs():
        if a * bs > pos:
            _append(out, Extent(pos, a * bs - pos, ZERO))
        for w in range(a, b, PLAN_WINDOW):
            n = min(PLAN_WINDOW, b - w)
            first = at + w - a
            flags = bytes(n)
            found = index.blocks.lookup(manifest.fps[first * fp : (first + n) * fp])
            ext = native.extents(flags, found, bs)
            for i in range(len(ext)):
                off = (w + ext.start[i]) * bs
                length = min(ext.count[i] * bs, size - off)
                kind = _KINDS[ext.kind[i]]
                if kind == COPY:
                    src = ext.source[i]
                    out.paths[src] = index.path_of(src)
                    _append(out, Extent(off, length, COPY, src, ext.offset[i]))
                else:
                    _append(out, Extent(off, length, kind))
        pos = min(b * bs, size)
    if pos < size:
        _append(out, Extent(pos, size - pos, ZERO))
    return out


def refine_windows(missing: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Windows to chunk around long missing runs, padded so CDC re-aligns before them."""
    pad = native.CDC_MAX
    windows: list[tuple[int, int]] = []
    for off, length in missing:
        if length < REFINE_MIN_RUN:
            continue
        a, b = max(0, off - pad), min(size, off + length + pad)
        if windows and a <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(b, windows[-1][1]))
        else:
            windows.append((a, b))
    return windows


def chunk_list(image: str | os.PathLike[str], missing: list[tuple[int, int]]) -> bytes:
    """Sender side: CDC fingerprints of the chunks that overlap long missing runs."""
    size = os.stat(image).st_size
    cl = chunk_file(image, refine_windows(missing, size))
    spans = sorted(missing)
    out = bytearray()
    j = 0
    fp = native.FP_BYTES
    for k in range(len(cl)):
        o, n = cl.offsets[k], cl.lens[k]
        if cl.flags[k] & native.FLAG_ZERO:
            continue
        while j < len(spans) and spans[j][0] + spans[j][1] <= o:
            j += 1
        if j < len(spans) and spans[j][0] < o + n:
            out += _ENTRY.pack(o, n, bytes(cl.fps[k * fp : (k + 1) * fp]))
    return bytes(out)


def refine(p: Plan, chunks: bytes, index: LocalIndex) -> Plan:
    """Receiver side: turn missing bytes that local CDC chunks hold into copies."""
    if len(chunks) % _ENTRY.size or len(chunks) > MAX_CHUNK_LIST:
        raise ManifestError(f"chunk list of {len(chunks)} bytes is malformed or too large")
    if not chunks:
        return p
    entries = [_ENTRY.unpack_from(chunks, i) for i in range(0, len(chunks), _ENTRY.size)]
    fps = b"".join(e[2] for e in entries)
    found = index.chunks.lookup(fps, bytes(len(entries)))
    hits: list[tuple[int, int, int, int]] = []  # (offset, len, source, source offset)
    for k, (o, n, _fp) in enumerate(entries):
        if found.sources[k] >= 0 and found.lens[k] == n and o + n <= p.size:
            hits.append((o, n, found.sources[k], found.offsets[k]))
    if not hits:
        return p
    hits.sort()
    out = Plan(p.size, paths=dict(p.paths))
    h = 0
    for e in p.extents:
        if e.kind != MISSING:
            out.extents.append(e)
            continue
        pos, end = e.offset, e.offset + e.length
        while h < len(hits) and hits[h][0] + hits[h][1] <= pos:
            h += 1
        k = h
        while pos < end and k < len(hits) and hits[k][0] < end:
            o, n, src, so = hits[k]
            a, b = max(pos, o), min(end, o + n)
            if a < b:
                if a > pos:
                    out.extents.append(Extent(pos, a - pos, MISSING))
                out.extents.append(Extent(a, b - a, COPY, src, so + (a - o)))
                out.paths[src] = index.path_of(src)
                pos = b
            k += 1
        if pos < end:
            out.extents.append(Extent(pos, end - pos, MISSING))
    return out


def coalesce(p: Plan, max_ranges: int) -> Plan:
    """Merge the missing ranges separated by the shortest gaps until at most ``max_ranges``.

    A plan for a huge image with scattered changes can list more ranges than a
    message may carry; sending a few more local bytes is the cheaper fix.
    """
    gaps = []  # (gap bytes, index of the extent before the gap)
    ext = p.extents
    missing_at = [i for i, e in enumerate(ext) if e.kind == MISSING]
    excess = len(missing_at) - max_ranges
    if excess <= 0:
        return p
    for a, b in itertools.pairwise(missing_at):
        gaps.append((ext[b].offset - (ext[a].offset + ext[a].length), a, b))
    merge = sorted(gaps)[:excess]
    absorbed: set[int] = set()
    for _gap, a, b in merge:
        absorbed.update(range(a + 1, b + 1))
    out = Plan(p.size, paths=dict(p.paths))
    for i, e in enumerate(ext):
        if i in absorbed:
            last = out.extents[-1]
            out.extents[-1] = Extent(last.offset, e.offset + e.length - last.offset, MISSING)
        else:
            out.extents.append(e)
    return out


# --- compact serialisation (delta files) ---------------------------------------

_PLAN_HEAD = struct.Struct("<QI")


def plan_to_bytes(p: Plan) -> bytes:
    """Columnar form: kinds, lengths, sources, source offsets relative to the extent."""
    kinds = bytes({ZERO: 0, COPY: 1, MISSING: 2}[e.kind] for e in p.extents)
    lengths = array("Q", (e.length for e in p.extents))
    sources = array("i", (e.source for e in p.extents))
    # Copies from the same offset encode as 0: most of a plan then compresses away.
    rel = array("q", (e.source_offset - e.offset if e.kind == COPY else 0 for e in p.extents))
    return (
        _PLAN_HEAD.pack(p.size, len(p.extents))
        + kinds
        + lengths.tobytes()
        + sources.tobytes()
        + rel.tobytes()
    )


def plan_from_bytes(data: bytes, paths: dict[int, Path]) -> Plan:
    """Decode ``plan_to_bytes`` output; every extent is checked against the image size."""
    if len(data) < _PLAN_HEAD.size:
        raise ManifestError("plan truncated")
    size, n = _PLAN_HEAD.unpack_from(data)
    if n > size or len(data) != _PLAN_HEAD.size + n * (1 + 8 + 4 + 8):
        raise ManifestError("plan length does not match its extent count")
    pos = _PLAN_HEAD.size
    kinds = data[pos : pos + n]
    pos += n
    lengths = array("Q", data[pos : pos + 8 * n])
    pos += 8 * n
    sources = array("i", data[pos : pos + 4 * n])
    pos += 4 * n
    rel = array("q", data[pos : pos + 8 * n])
    names = (ZERO, COPY, MISSING)
    out = Plan(size, paths=dict(paths))
    off = 0
    for i in range(n):
        if kinds[i] > 2:
            raise ManifestError(f"plan extent {i} has an unknown kind {kinds[i]}")
        kind = names[kinds[i]]
        if lengths[i] == 0 or off + lengths[i] > size:
            raise ManifestError(f"plan extent {i} is empty or runs past the image end")
        if kind == COPY and (sources[i] not in paths or off + rel[i] < 0):
            raise ManifestError(f"plan extent {i} copies from an unknown source")
        out.extents.append(
            Extent(
                off,
                lengths[i],
                kind,
                sources[i] if kind == COPY else -1,
                off + rel[i] if kind == COPY else 0,
            )
        )
        off += lengths[i]
    if off != size:
        raise ManifestError(f"plan covers {off} bytes of a {size}-byte image")
    return out
