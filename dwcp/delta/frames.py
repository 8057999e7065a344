"""Compressed data frames (HDE): the missing bytes of an image, batched for zstd.

A frame carries one or more (offset, length) ranges of the image compressed
together as one zstd frame of >= 1 MiB input: per-chunk frames lose 4-20% of
the ratio (research notes). Frames are self-describing and checksummed, and
decoding enforces hard limits so a hostile or corrupt frame can neither crash
the decoder nor make it allocate more than ``MAX_FRAME_RAW`` bytes.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import xxhash
import zstandard

from dwcp.delta.reader import ImageReader
from dwcp.errors import FrameError, ImageError

MAGIC = b"DF"
VERSION = 1
BATCH_BYTES = 1 << 20  # aim for this much input per zstd frame
MAX_FRAME_RAW = 16 << 20  # hard cap on one frame's decompressed size
MAX_RANGES = 4096  # hard cap on ranges in one frame
DEFAULT_LEVEL = 1

_HEAD = struct.Struct("<2sBBIII Q")  # magic version level n_ranges raw_len comp_len checksum
_RANGE = struct.Struct("<QI")
HEADER_SIZE = _HEAD.size
_CHECKED_HEAD = HEADER_SIZE - 8  # the header up to its checksum


@dataclass(frozen=True, slots=True)
class Piece:
    """One decoded range: ``data`` belongs at image ``offset``."""

    offset: int
    data: memoryview


def _batches(ranges: Iterable[tuple[int, int]], batch: int) -> Iterator[list[tuple[int, int]]]:
    """Group ranges into batches of about ``batch`` bytes, splitting long ranges."""
    cur: list[tuple[int, int]] = []
    size = 0
    for off, length in ranges:
        while length > 0:
            take = min(length, batch - size)
            cur.append((off, take))
            size += take
            off += take
            length -= take
            if size >= batch or len(cur) >= MAX_RANGES:
                yield cur
                cur, size = [], 0
    if cur:
        yield cur


def _checksum(*parts: bytes | memoryview) -> int:
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return int(h.intdigest())


def _frame(
    reader: ImageReader, ranges: list[tuple[int, int]], cctx: zstandard.ZstdCompressor, level: int
) -> bytes:
    raw = b"".join(reader.read(o, n) for o, n in ranges)
    comp = cctx.compress(raw)
    table = b"".join(_RANGE.pack(o, n) for o, n in ranges)
    head = _HEAD.pack(MAGIC, VERSION, level & 0xFF, len(ranges), len(raw), len(comp), 0)
    # The checksum covers every header field before it, the range table and the payload.
    checksum = _checksum(head[:_CHECKED_HEAD], table, comp)
    return head[:_CHECKED_HEAD] + struct.pack("<Q", checksum) + table + comp


def encode(
    image: str | os.PathLike[str],
    ranges: Iterable[tuple[int, int]],
    *,
    level: int | Callable[[], int] = DEFAULT_LEVEL,
    threads: int = 1,
    batch_bytes: int = BATCH_BYTES,
) -> Iterator[bytes]:
    """Yield frames carrying ``ranges`` of ``image``, compressed at zstd ``level``.

    ``level`` may be a callable, asked before each frame (an adaptive choice:
    ``dwcp.pba.compression``); the level is in each frame's header.

    ``threads > 1`` compresses several batches at once (zstd releases the GIL),
    keeping at most ``2 * threads`` batches in flight so memory stays bounded.
    A file that shrinks meanwhile raises ``ImageError`` (never SIGBUS).
    """
    if not 0 < batch_bytes <= MAX_FRAME_RAW:
        raise ValueError(f"batch_bytes must be in 1..{MAX_FRAME_RAW}")
    with ImageReader(image) as reader:
        yield from _encode(reader, ranges, level, threads, batch_bytes)


def _encode(
    reader: ImageReader,
    ranges: Iterable[tuple[int, int]],
    level: int | Callable[[], int],
    threads: int,
    batch_bytes: int,
) -> Iterator[bytes]:
    size = reader.size
    pick: Callable[[], int] = level if callable(level) else (lambda: level)

    def checked() -> Iterator[tuple[int, int]]:
        for off, length in ranges:
            if off < 0 or length < 0 or off + length > size:
                raise ImageError(
                    f"range {off}+{length} is outside the {size}-byte image; "
                    "the image changed since it was scanned"
                )
            yield off, length

    if threads <= 1:
        cctxs: dict[int, zstandard.ZstdCompressor] = {}
        for batch in _batches(checked(), batch_bytes):
            lv = pick()
            cctx = cctxs.get(lv) or cctxs.setdefault(lv, zstandard.ZstdCompressor(level=lv))
            yield _frame(reader, batch, cctx, lv)
        return
    # A compressor is not thread-safe: one per worker thread, reused across batches.
    local = threading.local()

    def work(batch: list[tuple[int, int]], lv: int) -> bytes:
        cctxs = getattr(local, "cctxs", None)
        if cctxs is None:
            cctxs = local.cctxs = {}
        cctx = cctxs.get(lv) or cctxs.setdefault(lv, zstandard.ZstdCompressor(level=lv))
        return _frame(reader, batch, cctx, lv)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = []
        for batch in _batches(checked(), batch_bytes):
            pending.append(pool.submit(work, batch, pick()))
            if len(pending) >= 2 * threads:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def decode(frame: bytes | memoryview, *, max_raw: int = MAX_FRAME_RAW) -> list[Piece]:
    """Decode one frame; any malformation raises ``FrameError``."""
    mv = memoryview(frame)
    if len(mv) < HEADER_SIZE:
        raise FrameError(f"frame truncated: {len(mv)} bytes, the header alone is {HEADER_SIZE}")
    magic, version, _level, n, raw_len, comp_len, checksum = _HEAD.unpack_from(mv)
    if magic != MAGIC:
        raise FrameError("not a dwcp data frame (bad magic)")
    if version != VERSION:
        raise FrameError(f"data frame version {version} is not supported (expected {VERSION})")
    if n == 0 or n > MAX_RANGES or raw_len > max_raw:
        raise FrameError(f"data frame claims {n} ranges / {raw_len} bytes, over the limits")
    table_end = HEADER_SIZE + n * _RANGE.size
    if len(mv) != table_end + comp_len:
        raise FrameError(
            f"data frame length {len(mv)} does not match its header ({table_end + comp_len})"
        )
    if _checksum(mv[:_CHECKED_HEAD], mv[HEADER_SIZE:]) != checksum:
        raise FrameError("data frame checksum mismatch: the frame was corrupted in transit")
    ranges = [_RANGE.unpack_from(mv, HEADER_SIZE + i * _RANGE.size) for i in range(n)]
    if sum(length for _, length in ranges) != raw_len:
        raise FrameError("data frame ranges do not add up to its payload size")
    try:
        # zstd allocates what the frame declares: check the declaration first.
        declared = zstandard.frame_content_size(mv[table_end:])
        if declared != raw_len:
            raise FrameError(f"data frame payload declares {declared} bytes, header says {raw_len}")
        raw = zstandard.ZstdDecompressor().decompress(mv[table_end:], max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise FrameError(f"data frame payload does not decompress: {exc}") from exc
    if len(raw) != raw_len:
        raise FrameError(f"data frame payload is {len(raw)} bytes, header says {raw_len}")
    out = memoryview(raw)
    pieces = []
    pos = 0
    for off, length in ranges:
        pieces.append(Piece(off, out[pos : pos + length]))
        pos += length
    return pieces


def raw_length(frame: bytes | memoryview) -> int:
    """Image bytes a frame carries, from its header alone (0 if it has no header)."""
    if len(frame) < HEADER_SIZE:
        return 0
    return int(_HEAD.unpack_from(frame)[4])


def frame_length(header: bytes | memoryview) -> int:
    """Total length of the frame whose first ``HEADER_SIZE`` bytes are ``header``.

    Lets a reader of a byte stream know how much to read before ``decode``.
    """
    if len(header) < HEADER_SIZE:
        raise FrameError("frame header truncated")
    magic, version, _level, n, raw_len, comp_len, _ = _HEAD.unpack_from(header)
    if magic != MAGIC or version != VERSION:
        raise FrameError("not a dwcp data frame (bad magic or version)")
    if n == 0 or n > MAX_RANGES or raw_len > MAX_FRAME_RAW:
        raise FrameError("data frame header over the limits")
    if comp_len > MAX_FRAME_RAW + MAX_FRAME_RAW // 64 + 4096:
        raise FrameError("data frame compressed size over the limits")
    return int(HEADER_SIZE + n * _RANGE.size + comp_len)
