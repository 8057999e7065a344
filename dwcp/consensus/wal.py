"""File-backed write-ahead log of one replica.

Layout: ``MAGIC, u32 header length, header, u32 crc`` then records, each
``u32 length, u32 crc32, data``. The header names the cluster, replica id and
replica public key, so a log copied from another replica or cluster is refused
instead of silently replayed. A record cut short or failing its CRC at the very
end of the file is a torn write from a crash and is dropped (and the file
truncated there); a bad record followed by more data is corruption and raises
``WalError``: the replica must then be restarted in recovering mode without it.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgpack

from dwcp.consensus.actions import Action, Compact, Persist
from dwcp.errors import WalError

MAGIC = b"DWCPWAL1"
_U32 = struct.Struct("<I")
_REC = struct.Struct("<II")
MAX_RECORD = 1 << 30


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _frame(record: bytes) -> bytes:
    return _REC.pack(len(record), zlib.crc32(record)) + record


class Wal:
    """Append-only log with one fsync per ``append`` call and atomic ``rewrite``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cluster_id: bytes,
        replica_id: int,
        public_key: bytes,
        create: bool = False,
    ) -> None:
        self.path = Path(path)
        self._header = msgpack.packb([cluster_id, replica_id, public_key], use_bin_type=True)
        self._records: list[bytes] = []
        self.torn_tail = False
        if not self.path.exists():
            if not create:
                raise WalError(
                    f"write-ahead log {self.path} is missing; if this replica lost its log, "
                    "start it in recovering mode (Replica(..., recovering=True)) so it does not "
                    "vote as if it had never voted"
                )
            self._write_file(self.path, ())
        self._records = self._read()
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for appends

    def _head_bytes(self) -> bytes:
        h = self._header
        return MAGIC + _U32.pack(len(h)) + h + _U32.pack(zlib.crc32(h))

    def _write_file(self, path: Path, records: Iterable[bytes]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(self._head_bytes())
            for r in records:
                fh.write(_frame(r))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path)

    def _read(self) -> list[bytes]:
        data = self.path.read_bytes()
        head = self._head_bytes()
        if not data.startswith(MAGIC):
            raise WalError(f"{self.path} is not a dwcp write-ahead log")
        if data[: len(head)] != head:
            raise WalError(
                f"{self.path} belongs to another cluster or replica (header mismatch); "
                "point this replica at its own log"
            )
        pos, end = len(head), len(data)
        records: list[bytes] = []
        while pos < end:
            if end - pos < _REC.size:
                self._truncate(pos)
                break
            length, crc = _REC.unpack_from(data, pos)
            start, stop = pos + _REC.size, pos + _REC.size + length
            if length > MAX_RECORD or stop > end:
                self._truncate(pos)
                break
            rec = data[start:stop]
            if zlib.crc32(rec) != crc:
                if stop == end:
                    self._truncate(pos)
                    break
                raise WalError(
                    f"{self.path}: record at byte {pos} is corrupt and followed by more data; "
                    "the log cannot be trusted: restart the replica in recovering mode"
                )
            records.append(rec)
            pos = stop
        return records

    def _truncate(self, pos: int) -> None:
        self.torn_tail = True
        with open(self.path, "r+b") as fh:
            fh.truncate(pos)
            fh.flush()
            os.fsync(fh.fileno())

    def replay(self) -> list[bytes]:
        """The records found when the log was opened (a torn last record dropped)."""
        return list(self._records)

    def append(self, records: Sequence[bytes]) -> None:
        """Append ``records`` and make them durable with a single fsync."""
        if not records:
            return
        self._file.write(b"".join(_frame(r) for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def rewrite(self, records: Sequence[bytes]) -> None:
        """Atomically replace the log's records (used to drop what a stable checkpoint covers)."""
        self._file.close()
        self._write_file(self.path, records)
        self._file = open(self.path, "ab")  # noqa: SIM115

    def perform(self, actions: Sequence[Action]) -> list[Action]:
        """Make every Persist/Compact in ``actions`` durable; return the other actions in order.

        Doing all writes first (one fsync per group) keeps "durable before any later
        action" for every record.
        """
        out: list[Action] = []
        pending: list[bytes] = []
        for a in actions:
            if isinstance(a, Persist):
                pending.append(a.record)
            elif isinstance(a, Compact):
                self.append(pending)
                pending = []
                self.rewrite(a.records)
            else:
                out.append(a)
        self.append(pending)
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Wal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
