"""Rebuild an image on the receiver (HDE): resumable, verified, atomic.

Received data is written into a sparse temporary file in a state directory,
and a journal records which ranges are durable, so an interrupted transfer
resumes with ``pending()``. The locally held extents are copied, every block
checked against the manifest's fingerprints and the whole image against its
SHA-256 (``Finisher``: in the background from ``start``, while data arrives);
``finish`` then fsyncs, and only then renames the file into place: the output
path never holds a partial or wrong image.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import shutil
import struct
from pathlib import Path

import xxhash

from dwcp.delta import frames, native
from dwcp.delta.finisher import Finisher
from dwcp.delta.manifest import Manifest
from dwcp.delta.planner import COPY, Plan
from dwcp.errors import (
    DiskFullError,
    DwcpError,
    IntegrityError,
    LocalImageChangedError,
    ProtocolError,
    StorageError,
)

FLUSH_BYTES = 64 << 20  # make received data durable (and journal it) at least this often
JOURNAL_RESERVE = 256 << 10  # journal space allocated ahead (10,900 records)
_REC = struct.Struct("<QQQ")  # offset, length, xxh3-64 of the two
_META = struct.Struct("<Q32s")


def disk_error(exc: OSError, where: Path) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"no space left on the device holding {where}; free space and re-run to resume"
        )
    return StorageError(f"cannot write {where}: {exc.strerror}")


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], off + length)
            out[-1] = (out[-1][0], end - out[-1][0])
        elif length > 0:
            out.append((off, length))
    return out


def _subtract(ranges: list[tuple[int, int]], done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` minus ``done`` (both sorted, ``done`` merged)."""
    out: list[tuple[int, int]] = []
    j = 0
    for off, length in ranges:
        pos, end = off, off + length
        while j < len(done) and done[j][0] + done[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(done) and done[k][0] < end:
            a, b = done[k][0], done[k][0] + done[k][1]
            if a > pos:
                out.append((pos, a - pos))
            pos = max(pos, b)
            k += 1
        if pos < end:
            out.append((pos, end - pos))
    return out


class Rebuilder:
    """Receiver side of one image transfer."""

    def __init__(
        self,
        *,
        size: int,
        sha256: bytes,
        plan: Plan,
        out_path: str | os.PathLike[str],
        state_dir: str | os.PathLike[str] | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        if plan.size != size:
            raise ValueError("the plan is for an image of another size")
        self.size = size
        self.sha256 = sha256
        self.plan = plan
        self.manifest = manifest
        self.out_path = Path(out_path)
        self.state_dir = (
            Path(state_dir)
            if state_dir is not None
            else self.out_path.parent / f".{self.out_path.name}.dwcp-partial"
        )
        self._part = self.state_dir / "image.part"
        self._journal = self.state_dir / "journal"
        self._missing = _merge(plan.missing)
        self._starts = [o for o, _ in self._missing]
        self._unjournaled: list[tuple[int, int]] = []
        self._dirty = 0
        self.received = 0
        self._fd = self._jfd = -1
        self._jpos = self._jend = 0  # journal: where the next record goes, space reserved
        self._finisher: Finisher | None = None
        self._done = self._open_state()

    @classmethod
    def for_manifest(
        cls,
        manifest: Manifest,
        plan: Plan,
        out_path: str | os.PathLike[str],
        state_dir: str | os.PathLike[str] | None = None,
    ) -> Rebuilder:
        return cls(
            size=manifest.size,
            sha256=manifest.sha256,
            plan=plan,
            out_path=out_path,
            state_dir=state_dir,
            manifest=manifest,
        )

    # --- state ----------------------------------------------------------------

    def _open_state(self) -> list[tuple[int, int]]:
        meta_path = self.state_dir / "meta"
        meta = _META.pack(self.size, self.sha256)
        try:
            if meta_path.exists() and meta_path.read_bytes() == meta and self._part.exists():
                done = self._read_journal()
            else:
                if self.state_dir.exists():
                    shutil.rmtree(self.state_dir)
                self.state_dir.mkdir(parents=True)
                self._check_space()
                with open(self._part, "wb") as f:
                    f.truncate(self.size)
                    os.fsync(f.fileno())
                self._journal.write_bytes(b"")
                tmp = meta_path.with_suffix(".tmp")
                tmp.write_bytes(meta)
                os.replace(tmp, meta_path)
                done = []
            self._fd = os.open(self._part, os.O_RDWR)
            self._jfd = os.open(self._journal, os.O_WRONLY | os.O_CREAT, 0o600)
            self._jpos = self._jend = os.fstat(self._jfd).st_size
            self._reserve_journal(JOURNAL_RESERVE)
        except StorageError:
            raise
        except OSError as exc:
            raise disk_error(exc, self.state_dir) from exc
        return _merge(done)

    def _check_space(self) -> None:
        need = self.plan.bytes_missing + self.plan.bytes_local
        st = os.statvfs(self.state_dir)
        free = st.f_bavail * st.f_frsize
        if need > free:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            raise DiskFullError(
                f"{self.state_dir.parent} has {free} bytes free, the image needs {need}; "
                "free space or choose another data directory"
            )

    def _read_journal(self) -> list[tuple[int, int]]:
        """Records before the first torn one; the journal is cut there so appends stay valid."""
        data = self._journal.read_bytes() if self._journal.exists() else b""
        done = []
        valid = 0
        for i in range(0, len(data) - len(data) % _REC.size, _REC.size):
            off, length, check = _REC.unpack_from(data, i)
            if xxhash.xxh3_64_intdigest(struct.pack("<QQ", off, length)) != check:
                break
            if off + length > self.size:
                break
            done.append((off, length))
            valid = i + _REC.size
        if valid != len(data):
            with open(self._journal, "ab") as f:
                f.truncate(valid)
                os.fsync(f.fileno())
        return done

    def _flush(self) -> None:
        if not self._unjournaled:
            return
        try:
            os.fsync(self._fd)
            recs = b"".join(
                _REC.pack(o, n, xxhash.xxh3_64_intdigest(struct.pack("<QQ", o, n)))
                for o, n in self._unjournaled
            )
            if self._jpos + len(recs) > self._jend:
                self._reserve_journal(len(recs) + JOURNAL_RESERVE)
            view = memoryview(recs)
            while view:
                done = os.pwrite(self._jfd, view, self._jpos)
                view, self._jpos = view[done:], self._jpos + done
            os.fsync(self._jfd)
        except OSError as exc:
            raise self._write_error(exc) from exc
        self._done = _merge(self._done + self._unjournaled)
        self._unjournaled = []
        self._dirty = 0

    def _reserve_journal(self, n: int) -> None:
        """Allocate journal space ahead (zeros read as the journal's end), so the records of
        what was received can still be written when the data fills the disk."""
        os.posix_fallocate(self._jfd, self._jend, n)
        self._jend += n

    def _write_error(self, exc: OSError) -> StorageError:
        """A failed write; a full disk keeps what is durable and says what is missing."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return disk_error(exc, self.state_dir)
        try:
            st = os.statvfs(self.state_dir)
            free = f"{st.f_bavail * st.f_frsize} bytes free now"
        except OSError:
            free = "free space unknown"
        durable = sum(n for _, n in self._done)
        return DiskFullError(
            f"no space left on the device holding {self.state_dir}: the {durable} bytes "
            f"received so far are kept; {self.bytes_pending} more bytes are needed "
            f"({free}); free space and re-run to resume"
        )

    # --- receiving --------------------------------------------------------------

    def pending(self) -> list[tuple[int, int]]:
        """Missing ranges not yet durably received (what to ask the sender for)."""
        return _subtract(self._missing, _merge(self._done + self._unjournaled))

    @property
    def bytes_pending(self) -> int:
        return sum(n for _, n in self.pending())

    def _check_piece(self, off: int, data: memoryview) -> None:
        end = off + len(data)
        i = bisect.bisect_right(self._starts, off) - 1
        if i < 0 or end > self._missing[i][0] + self._missing[i][1]:
            raise ProtocolError(
                f"the sender sent bytes {off}..{end} that were not asked for; "
                "it is faulty or runs another plan"
            )
        m = self.manifest
        if m is None or off % m.block_size:
            return
        bs = m.block_size
        full = len(data) // bs * bs if end < self.size else len(data)
        if not full:
            return
        fps, flags, _ = native.block_fingerprints(data[:full], bs)
        want, want_flags = m.window(off // bs, len(flags))
        if fps != want or flags != want_flags:
            raise IntegrityError(
                f"bytes {off}..{off + full} from the sender do not match the manifest's "
                "fingerprints; the sender is faulty or its image changed"
            )

    def feed(self, frame: bytes | memoryview) -> int:
        """Apply one data frame; returns the bytes it carried."""
        if self._fd < 0:
            raise ValueError("this Rebuilder is closed; open a new one to resume")
        pieces = frames.decode(frame)
        n = 0
        for piece in pieces:
            self._check_piece(piece.offset, piece.data)
        try:
            for piece in pieces:
                view, at = piece.data, piece.offset
                while view:  # a write near a full disk may be short
                    done = os.pwrite(self._fd, view, at)
                    view, at = view[done:], at + done
                self._unjournaled.append((piece.offset, len(piece.data)))
                n += len(piece.data)
        except OSError as exc:
            raise self._write_error(exc) from exc
        if self._finisher is not None:
            self._finisher.received([(p.offset, len(p.data)) for p in pieces])
        self.received += n
        self._dirty += n
        if self._dirty >= FLUSH_BYTES:
            self._flush()
        return n

    # --- completion ---------------------------------------------------------------

    def start(self) -> None:
        """Begin copying the local extents and verifying, in image order, in the background.

        Optional: ``finish`` starts the pass itself when it was not started. Started
        early (once the plan is known), it runs while the missing data arrives.
        """
        if self._finisher is None and self._fd >= 0:
            self._finisher = Finisher(self._fd, self.size, self.plan, self.manifest, self.pending())

    def _stop_finisher(self) -> None:
        fin, self._finisher = self._finisher, None
        if fin is not None:
            fin.stop()

    def _mismatch(self, where: int) -> None:
        """Raise for a block of the rebuilt image that does not match the manifest."""
        local = [e for e in self.plan.extents if e.offset <= where < e.offset + e.length]
        if local and local[0].kind == COPY:
            path = self.plan.paths.get(local[0].source)
            # What was received is still good: keep it, re-plan and resume.
            self.close()
            raise LocalImageChangedError(
                f"local image {path} changed since it was indexed (block at offset {where}); "
                "re-index it and re-run: the data received so far is kept"
            )
        self.abort()
        raise IntegrityError(
            f"block at offset {where} of the rebuilt image does not match the manifest: "
            "the sender's data is wrong; nothing was written, re-run"
        )

    def finish(self) -> Path:
        """Complete, verify and atomically publish the image; returns its path."""
        left = self.pending()
        if left:
            self._flush()
            raise ProtocolError(
                f"{sum(n for _, n in left)} bytes in {len(left)} ranges are still missing"
            )
        self._flush()
        self.start()
        fin, self._finisher = self._finisher, None
        assert fin is not None
        try:
            digest = fin.result()
        except DwcpError:
            raise
        except OSError as exc:
            raise disk_error(exc, self.state_dir) from exc
        if fin.mismatch is not None:
            self._mismatch(fin.mismatch)
        if digest != self.sha256:
            self.abort()
            raise IntegrityError(
                f"the rebuilt image's SHA-256 {digest.hex()} is not the expected "
                f"{self.sha256.hex()}; nothing was written, re-run to transfer it again"
            )
        try:
            os.fsync(self._fd)
            self._close_fds()
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._part, self.out_path)
            dfd = os.open(self.out_path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise disk_error(exc, self.out_path) from exc
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.out_path

    def _close_fds(self) -> None:
        """Close once: a number closed twice may by then belong to another file."""
        fds, self._fd, self._jfd = (self._fd, self._jfd), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def close(self) -> None:
        """Stop without finishing, keeping what was received for a later resume.

        If the journal cannot be written (a full disk), what it already records stays
        valid: the data it misses is sent again on resume.
        """
        self._stop_finisher()
        try:
            if self._fd >= 0:
                self._flush()
        except DiskFullError:
            self._unjournaled = []
        finally:
            self._close_fds()

    def abort(self) -> None:
        """Stop and delete every partial state (the next attempt starts over)."""
        self._stop_finisher()
        self._close_fds()
        shutil.rmtree(self.state_dir, ignore_errors=True)
