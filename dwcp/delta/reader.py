"""Positional reads of an image that may change under us (HDE).

Images are read with ``pread`` into reused buffers, not ``mmap``: a file
truncated while mapped kills the process with SIGBUS (``cp new.img img``
truncates first), while a short read is an ordinary, typed error.
"""

from __future__ import annotations

import os
from pathlib import Path

from dwcp.errors import ImageError

StatKey = tuple[int, int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    """What must stay equal while an image is read: size, mtime, inode, device."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class ImageReader:
    """An open image; every read checks it got all the bytes it asked for."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ImageError(f"image {self.path} not found") from exc
        except OSError as exc:
            raise ImageError(f"cannot read image {self.path}: {exc.strerror}") from exc
        self.key = stat_key(os.fstat(self.fd))
        self.size = self.key[0]
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _changed(self) -> ImageError:
        return ImageError(
            f"image {self.path} changed while it was read; stop the VM or snapshot the "
            "image, then retry"
        )

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` from ``offset``."""
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise ImageError(f"cannot read image {self.path}: {exc.strerror}") from exc
            if n == 0:
                raise self._changed()
            done += n

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return bytes(buf)

    def check_unchanged(self) -> None:
        """Raise ``ImageError`` if the file's size, mtime or identity moved since open."""
        if stat_key(os.fstat(self.fd)) != self.key:
            raise self._changed()
        try:
            if stat_key(os.stat(self.path)) != self.key:
                raise self._changed()
        except FileNotFoundError as exc:
            raise self._changed() from exc
