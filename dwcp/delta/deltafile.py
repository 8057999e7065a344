"""Self-contained delta files (``dwcp delta`` / ``dwcp patch``), like rsync batches.

Layout: a header (target size and SHA-256, the identity of each base: size and
hash-tree root), the zstd-compressed plan, the data frames the wire would
carry, and a trailer that makes truncation detectable. The base images are
only read; the output appears only complete and verified.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import xxhash
import zstandard

from dwcp.delta import frames
from dwcp.delta.index import LocalIndex
from dwcp.delta.manifest import BLOCK_SIZE, scan_image
from dwcp.delta.planner import (
    Plan,
    chunk_list,
    plan,
    plan_from_bytes,
    plan_to_bytes,
    refine,
)
from dwcp.delta.rebuild import Rebuilder, disk_error
from dwcp.errors import BaseImageError, FrameError, ImageError

MAGIC = b"DWCPDLT\x01"
TRAILER = b"DWCPEND\x01"
_HEAD = struct.Struct("<8sHHQ32sI")  # magic, version, n_bases, size, sha256, plan_len
_BASE = struct.Struct("<Q16s")
_TAIL = struct.Struct("<8sQQ")  # trailer magic, frame count, xxh3-64 of all frames
MAX_PLAN = 256 << 20
MAX_BASES = 64
assert _TAIL.size == frames.HEADER_SIZE  # a reader tells them apart by magic


@dataclass(frozen=True)
class DeltaStats:
    bytes_image: int
    bytes_zero: int
    bytes_copied: int
    bytes_changed: int
    bytes_written: int
    seconds: float
    sha256: str
    level: int


def make_delta(
    new: str | os.PathLike[str],
    bases: list[str | os.PathLike[str]],
    out: str | os.PathLike[str] | BinaryIO,
    *,
    level: int = frames.DEFAULT_LEVEL,
    threads: int = 1,
) -> DeltaStats:
    """Write a delta of ``new`` against ``bases`` to ``out`` (atomically).

    ``out`` may also be an open binary stream (``dwcp delta -o -``): the format is
    written front to back, so a pipe works; the stream is not closed.
    """
    t0 = time.perf_counter()
    base_paths = [Path(b) for b in bases]
    for b in base_paths:
        if not b.is_file():
            raise BaseImageError(f"base image {b} not found")
    manifest = scan_image(new)
    index = LocalIndex.of_files(base_paths)
    p = plan(manifest, index)
    p = refine(p, chunk_list(new, p.missing), index)
    if not isinstance(out, str | os.PathLike):
        written = _write_delta(
            out,
            new,
            base_paths,
            index,
            manifest.size,
            manifest.sha256,
            p,
            level=level,
            threads=threads,
        )
        out.flush()
    else:
        out_path = Path(out)
        tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                written = _write_delta(
                    f,
                    new,
                    base_paths,
                    index,
                    manifest.size,
                    manifest.sha256,
                    p,
                    level=level,
                    threads=threads,
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out_path)
            dfd = os.open(out_path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the rename itself is durable
            finally:
                os.close(dfd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise disk_error(exc, out_path) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return DeltaStats(
        bytes_image=manifest.size,
        bytes_zero=p.bytes_zero,
        bytes_copied=p.bytes_local,
        bytes_changed=p.bytes_missing,
        bytes_written=written,
        seconds=time.perf_counter() - t0,
        sha256=manifest.sha256.hex(),
        level=level,
    )


def _write_delta(
    f: BinaryIO,
    new: str | os.PathLike[str],
    base_paths: list[Path],
    index: LocalIndex,
    size: int,
    sha256: bytes,
    p: Plan,
    *,
    level: int,
    threads: int,
) -> int:
    """Write the whole delta front to back; returns the bytes written."""
    packed = zstandard.ZstdCompressor(level=9).compress(plan_to_bytes(p))
    written = f.write(_HEAD.pack(MAGIC, 1, len(base_paths), size, sha256, len(packed)))
    for src in range(len(base_paths)):
        m = index.manifests[src]
        written += f.write(_BASE.pack(m.size, m.root))
    written += f.write(packed)
    count, digest = 0, xxhash.xxh3_64()
    for frame in frames.encode(new, p.missing, level=level, threads=threads):
        written += f.write(frame)
        digest.update(frame)
        count += 1
    written += f.write(_TAIL.pack(TRAILER, count, digest.intdigest()))
    return written


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FrameError(f"delta file truncated while reading {what}")
    return data


def _frames(f: BinaryIO) -> Iterator[bytes]:
    count, digest = 0, xxhash.xxh3_64()
    while True:
        head = f.read(frames.HEADER_SIZE)
        if head[:8] == TRAILER:
            if len(head) != _TAIL.size or f.read(1):
                raise FrameError("delta file trailer is damaged")
            _, want_count, want_digest = _TAIL.unpack(head)
            if want_count != count or want_digest != digest.intdigest():
                raise FrameError("delta file frames do not match its trailer (corrupted)")
            return
        if len(head) < frames.HEADER_SIZE:
            raise FrameError("delta file truncated: no trailer after the last frame")
        body = _read_exact(f, frames.frame_length(head) - len(head), "a data frame")
        frame = head + body
        digest.update(frame)
        count += 1
        yield frame


@dataclass(frozen=True)
class PatchStats:
    bytes_image: int
    seconds: float
    sha256: str


def apply_delta(
    delta: str | os.PathLike[str] | BinaryIO,
    bases: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
) -> PatchStats:
    """Rebuild the image a delta describes; ``out`` appears only verified.

    ``delta`` may be an open binary stream (``dwcp patch -``): it is read front to
    back and not closed.
    """
    t0 = time.perf_counter()
    if isinstance(delta, str | os.PathLike):
        try:
            f: BinaryIO = open(delta, "rb")  # noqa: SIM115
        except OSError as exc:
            raise ImageError(f"cannot read delta file {delta}: {exc.strerror}") from exc
        closing: contextlib.AbstractContextManager[BinaryIO] = f
    else:
        f, delta = delta, "the delta stream"
        closing = contextlib.nullcontext(f)
    with closing:
        magic, version, n_bases, size, sha, plan_len = _HEAD.unpack(
            _read_exact(f, _HEAD.size, "the header")
        )
        if magic != MAGIC:
            raise FrameError(f"{delta} is not a dwcp delta file")
        if version != 1:
            raise FrameError(f"delta file version {version} is not supported")
        if n_bases > MAX_BASES or plan_len > MAX_PLAN:
            raise FrameError("delta file header is over the limits (corrupted?)")
        idents = [_BASE.unpack(_read_exact(f, _BASE.size, "base list")) for _ in range(n_bases)]
        if len(bases) != n_bases:
            raise BaseImageError(
                f"this delta was made against {n_bases} base image(s); {len(bases)} given"
            )
        paths = {}
        for i, ((bsize, root), b) in enumerate(zip(idents, bases, strict=True)):
            if not Path(b).is_file():
                raise BaseImageError(f"base image {b} not found")
            m = scan_image(b, digest=False, block_size=BLOCK_SIZE)
            if (m.size, m.root) != (bsize, root):
                raise BaseImageError(
                    f"base #{i + 1} {b} is not the image this delta was made against "
                    f"(expected {bsize} bytes with tree root {root.hex()[:16]}...)"
                )
            paths[i] = Path(b)
        try:
            packed = _read_exact(f, plan_len, "the plan")
            declared = zstandard.frame_content_size(packed)
            # A plan has at most one 21-byte extent per image byte (checked again on decode).
            if declared < 0 or declared > min(MAX_PLAN, 12 + 21 * size):
                raise FrameError("delta file plan declares an impossible size (corrupted?)")
            raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=declared)
        except zstandard.ZstdError as exc:
            raise FrameError(f"delta file plan is corrupt: {exc}") from exc
        p: Plan = plan_from_bytes(raw, paths)
        if p.size != size:
            raise FrameError("delta file plan and header disagree on the image size")
        out_path = Path(out)
        state = out_path.with_name(f".{out_path.name}.dwcp-patch{os.getpid()}")
        rb = Rebuilder(size=size, sha256=sha, plan=p, out_path=out_path, state_dir=state)
        try:
            for frame in _frames(f):
                rb.feed(frame)
            rb.finish()
        except BaseException:
            rb.abort()
            raise
    return PatchStats(bytes_image=size, seconds=time.perf_counter() - t0, sha256=sha.hex())
