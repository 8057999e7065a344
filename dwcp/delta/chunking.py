"""Content-defined chunk lists of files or file regions (HDE fallback matcher).

Aligned 4 KiB matching misses data that moved by a few bytes (an insert near
the start of an image, a file copied between images); FastCDC chunks re-align
on content. Files are chunked in windows, one C call per window.
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

from dwcp.delta import native
from dwcp.errors import ImageError

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

    def extend_from(self, view: memoryview, start: int, end: int) -> None:
        """Chunk ``view[start:end]`` (offsets are relative to ``view``)."""
        pos = start
        while pos < end:
            stop = min(end, pos + WINDOW)
            final = stop == end
            ch = native.cdc_chunks(view[pos:stop], final=final)
            if ch.consumed == 0:  # the window is shorter than one max chunk: take it all
                ch = native.cdc_chunks(view[pos:end], final=True)
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
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror}") from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return out
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for start, end in windows if windows is not None else [(0, size)]:
                    out.extend_from(view, max(0, start), min(size, end))
            finally:
                view.release()
    return out
