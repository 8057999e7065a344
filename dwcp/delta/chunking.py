"""Content-defined chunk lists of files or file regions (HDE fallback matcher).

Aligned 4 KiB matching misses data that moved by a few bytes (an insert near
the start of an image, a file copied between images); FastCDC chunks re-align
on content. Files are chunked in windows, one C call per window.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

from dwcp.delta import native
from dwcp.delta.reader import ImageReader

WINDOW = 8 << 20


@dataclass
class ChunkList:
    """Chunks as parallel arrays: absolute ``offsets``, ``lens``, 16-byte ``fps``, ``flags``."""

    offsets: array[int] = field(default_factory=lambda: array("Q"))
    lens: array[int] = field(default_factory=lambda: array("I"))
    fps: bytearray = field(default_factory=bytearray)
    flags: bytearray = field(default_factory=bytearray)

    def __len__(self) -> int:
        return len(self.lens)

    def extend_from(self, reader: ImageReader, start: int, end: int) -> None:
        """Chunk bytes ``start..end`` of ``reader``'s file (one C call per window)."""
        buf = memoryview(bytearray(min(WINDOW, max(0, end - start))))
        pos = start
        while pos < end:
            stop = min(end, pos + WINDOW)
            view = buf[: stop - pos]
            reader.read_into(view, pos)
            ch = native.cdc_chunks(view, final=stop == end)
            if ch.consumed == 0:  # unreachable while WINDOW > CDC_MAX: take it all
                ch = native.cdc_chunks(view, final=True)
            off = pos
            for n in ch.lens:
                self.offsets.append(off)
                off += n
            self.lens.extend(ch.lens)
            self.fps += ch.fps
            self.flags += ch.flags
            pos += ch.consumed


def chunk_file(
    path: str | os.PathLike[str], windows: Iterable[tuple[int, int]] | None = None
) -> ChunkList:
    """CDC chunks of a whole file, or of the given (start, end) windows of it."""
    out = ChunkList()
    with ImageReader(path) as reader:
        size = reader.size
        for start, end in windows if windows is not None else [(0, size)]:
            out.extend_from(reader, max(0, start), min(size, end))
    return out
