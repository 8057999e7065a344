"""Copy local extents and verify a rebuilt image while its missing data arrives (HDE).

Finishing an image used to be three passes after the last byte arrived: copy
what the destination already held, read the whole image back for the block
fingerprints and the SHA-256, then fsync. For a warm update those passes were
most of the wall time. A ``Finisher`` thread does the copy and the checks in
image order as soon as the plan is known, and at each window waits only for
the missing bytes that window covers; when the last frame lands, only its own
window and the fsync remain.

Never-written regions (the plan's zero extents) are holes in the partial file
and are hashed as zeros from memory; only the receiver writes that file.

It reads back what the file holds (the page cache), so what it hashes is what
will be renamed into place, wherever the bytes came from.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Sequence

from dwcp.delta import native
from dwcp.delta.manifest import Manifest
from dwcp.delta.planner import COPY, ZERO, Plan
from dwcp.errors import ImageError

WINDOW = 8 << 20  # verified in this order and size; a multiple of every block size
COPY_CHUNK = 64 << 20  # largest single copy, so a stop request is seen soon
_ZEROS = bytes(WINDOW)
_ZERO_VIEW = memoryview(_ZEROS)


class Finisher:
    """The background copy-and-verify pass of one ``Rebuilder``: two threads, one
    copying the local extents, one verifying behind it (SHA-256 and the copy take
    about as long, and both release the GIL).

    ``received`` is called after each piece of missing data is written; ``result``
    joins the threads and returns the SHA-256, or raises what a thread met.
    A block that does not match the manifest is reported as ``mismatch`` (its
    offset) for the caller to classify.
    """

    def __init__(
        self,
        fd: int,
        size: int,
        plan: Plan,
        manifest: Manifest | None,
        pending: Sequence[tuple[int, int]],
    ) -> None:
        self._fd = fd
        self._size = size
        self._plan = plan
        self._manifest = manifest
        self._cond = threading.Condition()
        self._stop = False
        self._remaining: dict[int, int] = {}  # window -> missing bytes not yet written
        for off, length in pending:
            self._count(off, length, +1)
        self.mismatch: int | None = None
        self._error: BaseException | None = None
        self._digest: bytes | None = None
        self._copied = 0  # every local extent below this offset is copied
        self._copier = threading.Thread(target=self._copy_all, name="dwcp-copy", daemon=True)
        self._verifier = threading.Thread(target=self._verify_all, name="dwcp-verify", daemon=True)
        self._copier.start()
        self._verifier.start()

    def _count(self, off: int, length: int, sign: int) -> None:
        end = off + length
        while off < end:
            w = off // WINDOW
            step = min(end, (w + 1) * WINDOW) - off
            left = self._remaining.get(w, 0) + sign * step
            if left > 0:
                self._remaining[w] = left
            else:
                self._remaining.pop(w, None)
            off += step

    def received(self, pieces: Sequence[tuple[int, int]]) -> None:
        """These (offset, length) pieces of missing data are now written."""
        with self._cond:
            for off, length in pieces:
                self._count(off, length, -1)
            self._cond.notify_all()

    def stop(self) -> None:
        """Abandon the pass (the transfer stops); returns once the threads ended."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._copier.join()
        self._verifier.join()

    def result(self) -> bytes:
        """Wait for the pass to end; the image's SHA-256 (``mismatch`` set if a block failed)."""
        self._copier.join()
        self._verifier.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest

    # --- the threads ------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc  # re-raised in result()
            self._stop = True
            self._cond.notify_all()

    def _copy_all(self) -> None:
        """Copier thread: the local extents in image order, publishing how far it got."""
        copies = sorted((e for e in self._plan.extents if e.kind == COPY), key=lambda e: e.offset)
        fds: dict[int, int] = {}
        try:
            for k, e in enumerate(copies):
                fd = fds.get(e.source)
                if fd is None:
                    fd = fds[e.source] = self._open_source(e.source)
                self._copy(fd, e.source_offset, e.offset, e.length)
                with self._cond:
                    if self._stop:
                        return
                    self._copied = copies[k + 1].offset if k + 1 < len(copies) else self._size
                    self._cond.notify_all()
            with self._cond:
                self._copied = self._size
                self._cond.notify_all()
        except BaseException as exc:
            self._fail(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _verify_all(self) -> None:
        """Verifier thread: each window once it is copied and received, in image order."""
        sha = hashlib.sha256()
        window = memoryview(bytearray(min(WINDOW, self._size)))
        j = 0
        try:
            for pos in range(0, self._size, WINDOW):
                end = min(pos + WINDOW, self._size)
                with self._cond:
                    while not self._stop and (
                        pos // WINDOW in self._remaining or self._copied < end
                    ):
                        self._cond.wait()
                    if self._stop:
                        return
                j = self._skip(pos, j)
                e = self._plan.extents[j] if j < len(self._plan.extents) else None
                if (
                    e is not None
                    and e.kind == ZERO
                    and e.offset <= pos
                    and end <= e.offset + e.length
                ):
                    sha.update(_ZERO_VIEW[: end - pos])  # a hole the manifest says is zero
                    continue
                data = window[: end - pos]
                j = self._fill(pos, data, j)
                sha.update(data)
                if self._manifest is not None and self.mismatch is None:
                    self._check(pos, data)
            self._digest = sha.digest()
        except BaseException as exc:
            self._fail(exc)

    def _open_source(self, source: int) -> int:
        path = self._plan.paths[source]
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ImageError(f"local image {path} is gone; re-run the transfer to re-plan") from exc

    def _copy(self, src: int, src_off: int, dst_off: int, length: int) -> None:
        while length > 0:
            if self._stop:
                return
            want = min(length, COPY_CHUNK)
            try:
                n = os.copy_file_range(src, self._fd, want, src_off, dst_off)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                n = os.pwrite(self._fd, os.pread(src, min(want, 1 << 20), src_off), dst_off)
            if n == 0:
                raise ImageError("a local image is shorter than when it was indexed; re-run")
            src_off += n
            dst_off += n
            length -= n

    def _skip(self, pos: int, j: int) -> int:
        """Index of the first extent that ends after ``pos``, from ``j`` on."""
        extents = self._plan.extents
        while j < len(extents) and extents[j].offset + extents[j].length <= pos:
            j += 1
        return j

    def _fill(self, pos: int, buf: memoryview, j: int) -> int:
        """Fill ``buf`` with the image at ``pos``; returns the next extent index.

        Zero extents are never written, so the file holds holes there; reading a
        hole makes the kernel allocate and clear a page cache page per 4 KiB
        (~2 GB/s here, slower than SHA-256), so zeros come from memory instead.
        """
        extents = self._plan.extents
        end = pos + len(buf)
        at = pos
        while at < end:
            while j < len(extents) and extents[j].offset + extents[j].length <= at:
                j += 1
            e = extents[j] if j < len(extents) else None
            if e is None or e.offset > at:  # not in the plan: read what the file holds
                stop = end if e is None else min(end, e.offset)
                self._read(at, buf[at - pos : stop - pos])
            else:
                stop = min(end, e.offset + e.length)
                if e.kind == ZERO:
                    buf[at - pos : stop - pos] = _ZERO_VIEW[: stop - at]
                else:
                    self._read(at, buf[at - pos : stop - pos])
            at = stop
        return j

    def _read(self, off: int, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            n = os.preadv(self._fd, [buf[got:]], off + got)
            if n == 0:
                raise ImageError("the partial image is shorter than expected; re-run")
            got += n

    def _check(self, pos: int, data: memoryview) -> None:
        m = self._manifest
        assert m is not None
        bs = m.block_size
        fps, flags, _ = native.block_fingerprints(data, bs)
        want, want_flags = m.window(pos // bs, len(flags))
        if fps == want and flags == want_flags:
            return
        fp = native.FP_BYTES
        self.mismatch = pos + bs * next(
            (
                k
                for k in range(len(flags))
                if fps[k * fp : k * fp + fp] != want[k * fp : k * fp + fp]
                or flags[k] != want_flags[k]
            ),
            0,
        )
