"""The zstd level a transfer starts at, from the predicted link rate and a sample of its data.

``AdaptiveLevel`` (``dwcp.pba.compression``) corrects the level while frames
stream, one step per window, from how busy the encoder is; it starts blind.
This picks the starting point: a transfer is a pipeline (encoder thread ->
the sender's transport -> the link), so its time per input byte at level L
is the slowest stage's,

    max(1 / speed_L,  8 / (ratio_L * rate),  send_cpu / ratio_L)

where ``speed_L`` and ``ratio_L`` are measured on a small sample of the data
to send (compressibility differs by orders of magnitude between random,
system files and zero-filled blocks, so no table of typical values will
do), ``rate`` is the path's predicted rate (``Predictor.predict``) and
``send_cpu`` the transport's CPU seconds per wire byte (pure-Python QUIC:
about 43 s/GB on this project's test host, RESULTS.md), which makes fast
links CPU-bound. The level with the smallest time wins; that is the
research note's argmax min(cpu_L, P·ratio_L), with the transport's own CPU
stage added.

``choose_level`` is sans-IO; ``measure_levels`` is the part that runs zstd
and reads the thread's CPU clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from dwcp.errors import UsageError

LEVELS = tuple(range(1, 10))  # 10+ cost 2-4x the CPU of 9 for under 1% fewer bytes
SAMPLE_PIECES = 4
PIECE_BYTES = 1 << 20  # one frame each, so ratio and speed are those of real frames
FRAME = 1 << 20  # input per zstd frame (dwcp.delta.frames.BATCH_BYTES)
# The sender's CPU per wire byte: pure-Python QUIC, 1 conn x 1 stream, uvloop, 42.9 s/GB
# (RESULTS.md, the transport's CPU table). It makes fast links CPU-bound at the sender.
SEND_CPU_S_PER_BYTE = 42.9e-9


@dataclass(frozen=True, slots=True)
class LevelCost:
    """One level on one data sample: input bytes per CPU second, and input / output bytes."""

    level: int
    speed_Bps: float
    ratio: float


@dataclass(frozen=True, slots=True)
class LevelChoice:
    level: int
    seconds_per_gb: float  # predicted transfer time per GB of input at that level
    bound: str  # "cpu", "link" or "send": the stage that limits it
    table: tuple[tuple[int, float], ...]  # every level's predicted s/GB


def stage_times(cost: LevelCost, rate_bps: float, send_cpu_s_per_byte: float) -> dict[str, float]:
    """Seconds per input byte of each pipeline stage at this level."""
    wire = 1 / max(cost.ratio, 1e-9)
    return {
        "cpu": 1 / max(cost.speed_Bps, 1e-9),
        "link": wire * 8 / rate_bps,
        "send": wire * send_cpu_s_per_byte,
    }


def choose_level(
    costs: Iterable[LevelCost],
    rate_bps: float,
    *,
    send_cpu_s_per_byte: float = 0.0,
    nbytes: int | None = None,
    frame: int = FRAME,
) -> LevelChoice:
    """The level whose slowest pipeline stage is fastest at ``rate_bps``.

    With ``nbytes`` (the transfer's input size) the pipeline's fill and drain count
    too: the first frame is encoded before anything is sent and the last one sent
    after everything is encoded, which matters when a transfer is a few frames long.
    """
    if rate_bps <= 0:
        raise UsageError(f"rate {rate_bps} bit/s: predict the path's rate first")
    table = []
    best: tuple[float, int, str] | None = None
    for c in costs:
        st = stage_times(c, rate_bps, send_cpu_s_per_byte)
        bound = max(st, key=lambda k: st[k])
        t = st[bound]
        if nbytes:
            f = min(nbytes, frame)
            t += f * (st["cpu"] + max(st["link"], st["send"])) / nbytes
        table.append((c.level, round(t * 1e9, 3)))
        if best is None or t < best[0]:
            best = (t, c.level, bound)
    if best is None:
        raise UsageError("no compression levels measured")
    return LevelChoice(best[1], best[0] * 1e9, best[2], tuple(table))


def sample(data: bytes | memoryview, pieces: int = SAMPLE_PIECES, size: int = PIECE_BYTES) -> bytes:
    """``pieces`` evenly spaced pieces of ``data`` (all of it when it is small)."""
    if len(data) <= pieces * size:
        return bytes(data)
    step = (len(data) - size) // max(pieces - 1, 1)
    return b"".join(bytes(data[i * step : i * step + size]) for i in range(pieces))


def measure_levels(
    data: bytes,
    levels: Sequence[int] = LEVELS,
    piece: int = PIECE_BYTES,
    clock: Callable[[], float] = time.thread_time,
) -> list[LevelCost]:
    """Compress ``data`` in ``piece``-sized frames at each level, timed by ``clock``: the
    thread's CPU (what the level costs) or, as ``start_level`` does, the wall clock (what
    an encoder thread gets of a shared CPU now: on a loaded host it is a fraction of a
    core, and CPU time then overstates the encoder's rate and picks too high a level)."""
    if not data:
        raise UsageError("no data to measure compression on")
    out = []
    for level in levels:
        cctx = zstandard.ZstdCompressor(level=level)
        t0 = clock()
        size = sum(len(cctx.compress(data[i : i + piece])) for i in range(0, len(data), piece))
        cpu = max(clock() - t0, 1e-6)
        out.append(LevelCost(level, len(data) / cpu, len(data) / max(size, 1)))
    return out


BLOCK = 4096
_ZERO = bytes(BLOCK)


def _nonzero(data: bytes) -> bytes:
    """``data`` without its all-zero 4 KiB blocks: the source sends those as holes."""
    keep = [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]
    return b"".join(b for b in keep if b != _ZERO[: len(b)])


def read_sample(path: Path, pieces: int = SAMPLE_PIECES, size: int = PIECE_BYTES) -> bytes:
    """``sample`` of a file's data without reading all of it: evenly spaced pieces, their
    all-zero 4 KiB blocks left out (never compressed nor sent: a half-empty file system
    image would otherwise look twice as compressible as the data that goes out). When
    zeros leave less than half of ``pieces`` x ``size``, up to 16x the pieces are read;
    the sample is at most ``pieces`` x ``size`` and may be empty (an all-zero file)."""
    want = pieces * size
    with open(path, "rb") as f:
        length = f.seek(0, 2)
        if length <= want:
            f.seek(0)
            return _nonzero(f.read())
        out = b""
        for n in (pieces, pieces * 4, pieces * 16):
            step = (length - size) // max(n - 1, 1)
            parts = []
            for i in range(n):
                f.seek(i * step)
                parts.append(_nonzero(f.read(size)))
            out = b"".join(parts)
            if len(out) * 2 >= want or n * size >= length:
                break
        if len(out) <= want:
            return out
        keep = want // n // BLOCK * BLOCK or BLOCK  # the same share of every piece
        return b"".join(p[:keep] for p in parts)[:want]


def start_level(
    path: Path,
    rate_bps: float,
    *,
    nbytes: int | None = None,
    send_cpu_s_per_byte: float = SEND_CPU_S_PER_BYTE,
) -> LevelChoice:
    """The starting level for sending ``path`` over a link predicted at ``rate_bps``:
    its sample measured at every level, then ``choose_level``. Blocking (reads the file
    and runs zstd for a few tenths of a second): call it in a worker thread."""
    costs = measure_levels(read_sample(path), clock=time.perf_counter)  # the CPU left
    return choose_level(costs, rate_bps, send_cpu_s_per_byte=send_cpu_s_per_byte, nbytes=nbytes)
