"""The C chunker (``hde_cdc``) against a pure-Python statement of its definition.

Cut points must be identical on every machine and build (both ends of a
transfer chunk independently), so the definition is pinned here in Python: the
gear table, the 64-byte window hash, the one mask (no normalisation), the cut where a run
of >= min_size + 64 zero bytes ends, and the C side's zero-run skipping and block-wise
scan (optimisations that must not change any result).
"""

from __future__ import annotations

import random

import xxhash
from dwcp._hde import ffi, lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp.delta import native

M64 = (1 << 64) - 1
WINDOW = 64


def _gear() -> list[int]:
    """splitmix64 from the fixed seed "dwcp HDE" (hde.c gear_init)."""
    x = 0x6477637020484445
    out = []
    for _ in range(256):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


GEAR = _gear()


def _top(bits: int) -> int:
    return ((1 << bits) - 1) << (64 - bits)


def window_hash(window: bytes) -> int:
    """H(i) = sum_j GEAR[p[i - j]] << j over the 64 bytes ending at i."""
    assert len(window) == WINDOW
    return sum(GEAR[b] << j for j, b in enumerate(reversed(window))) & M64


def ref_cut(data: bytes, mn: int, avg: int, mx: int) -> int:
    """Length of the first chunk of ``data`` (the definition, one window at a time)."""
    n = len(data)
    if n <= mn:
        return n
    n = min(n, mx)
    mask = _top(avg.bit_length() - 1)
    run = mn + WINDOW
    for length in range(mn, n + 1):
        if not window_hash(data[length - WINDOW : length]) & mask:
            return length
        # A run of >= min_size + 64 zero bytes followed by data ends a chunk.
        zeros_before = length >= run and data[length - run : length] == bytes(run)
        if length < n and data[length] and zeros_before:
            return length
    return n


def ref_cut_rolling(data: bytes, mn: int, avg: int, mx: int) -> int:
    """``ref_cut`` with a rolling hash (same result, fast enough for 64 KiB chunks)."""
    n = len(data)
    if n <= mn:
        return n
    n = min(n, mx)
    mask = _top(avg.bit_length() - 1)
    h = zeros = 0
    for i in range(n):
        h = ((h << 1) + GEAR[data[i]]) & M64
        zeros = zeros + 1 if data[i] == 0 else 0
        length = i + 1
        if length < mn:
            continue
        if not h & mask:
            return length
        if length < n and zeros >= mn + WINDOW and data[length]:
            return length
    return n


def ref_chunks(data: bytes, mn: int, avg: int, mx: int, *, rolling: bool = False) -> list[int]:
    cut = ref_cut_rolling if rolling else ref_cut
    out, pos = [], 0
    while pos < len(data):
        n = cut(data[pos : pos + mx], mn, avg, mx)
        out.append(n)
        pos += n
    return out


def c_chunks(
    data: bytes, mn: int, avg: int, mx: int, *, final: bool = True
) -> tuple[list[int], bytes, bytes, int]:
    cap = len(data) // mn + 2
    lens = ffi.new("uint32_t[]", cap)
    fps = ffi.new("uint8_t[]", cap * 16)
    flags = ffi.new("uint8_t[]", cap)
    consumed = ffi.new("size_t *")
    k = lib.hde_cdc(data, len(data), mn, avg, mx, int(final), lens, fps, flags, cap, consumed)
    assert k >= 0
    return (
        [lens[i] for i in range(k)],
        bytes(ffi.buffer(fps, k * 16)),
        bytes(ffi.buffer(flags, k)),
        int(consumed[0]),
    )


SIZES = [(64, 256, 1024), (64, 64, 64), (100, 128, 300), (256, 512, 4096)]


@st.composite
def structured(draw: st.DrawFn, max_size: int = 6000) -> bytes:
    """Random bytes mixed with zero runs (the skip path) and repeated bytes."""
    parts = draw(
        st.lists(
            st.one_of(
                st.binary(min_size=1, max_size=700),
                st.integers(1, 1500).map(bytes),
                st.tuples(st.integers(0, 255), st.integers(1, 900)).map(
                    lambda t: bytes([t[0]]) * t[1]
                ),
            ),
            max_size=12,
        )
    )
    return b"".join(parts)[:max_size]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=structured(), sizes=st.sampled_from(SIZES))
def test_matches_window_definition(data: bytes, sizes: tuple[int, int, int]) -> None:
    lens, _, _, consumed = c_chunks(data, *sizes)
    assert lens == ref_chunks(data, *sizes)
    assert consumed == len(data)


def test_default_sizes_match_on_image_like_data() -> None:
    rng = random.Random(7)
    blocks = []
    for _ in range(120):
        r = rng.random()
        blocks.append(
            bytes(4096)
            if r < 0.35
            else bytes([rng.randrange(256)]) * 4096
            if r < 0.4
            else rng.randbytes(4096)
        )
    data = b"".join(blocks) + rng.randbytes(1234)
    sizes = (native.CDC_MIN, native.CDC_AVG, native.CDC_MAX)
    assert c_chunks(data, *sizes)[0] == ref_chunks(data, *sizes, rolling=True)
    assert list(native.cdc_chunks(data, final=True).lens) == ref_chunks(data, *sizes, rolling=True)


def test_long_zero_runs_are_skipped_exactly() -> None:
    rng = random.Random(3)
    data = (
        rng.randbytes(5000)
        + bytes(20000)
        + rng.randbytes(3000)
        + bytes(700)
        + b"\x01"
        + bytes(9000)
    )
    for sizes in SIZES:
        assert c_chunks(data, *sizes)[0] == ref_chunks(data, *sizes, rolling=True)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=structured(), sizes=st.sampled_from(SIZES))
def test_fingerprints_and_zero_flags(data: bytes, sizes: tuple[int, int, int]) -> None:
    lens, fps, flags, _ = c_chunks(data, *sizes)
    pos = 0
    for k, n in enumerate(lens):
        chunk = data[pos : pos + n]
        if chunk.count(0) == n:
            assert flags[k] == lib.HDE_FLAG_ZERO and fps[16 * k : 16 * k + 16] == bytes(16)
        else:
            assert flags[k] == 0 and fps[16 * k : 16 * k + 16] == xxhash.xxh3_128_digest(chunk)
        pos += n


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=structured(max_size=20000), sizes=st.sampled_from(SIZES))
def test_sizes_in_bounds_and_streaming_is_a_prefix(
    data: bytes, sizes: tuple[int, int, int]
) -> None:
    mn, _, mx = sizes
    lens, _, _, _ = c_chunks(data, *sizes)
    assert sum(lens) == len(data)
    assert all(mn <= n <= mx for n in lens[:-1])
    assert all(0 < n <= mx for n in lens[-1:])
    # Without ``final`` the chunker stops short of the tail and cuts the same chunks.
    part, _, _, consumed = c_chunks(data, *sizes, final=False)
    assert part == lens[: len(part)]
    assert consumed == sum(part) and len(data) - consumed < mx


def _chunk_set(data: bytes, sizes: tuple[int, int, int]) -> list[bytes]:
    lens, _, _, _ = c_chunks(data, *sizes)
    out, pos = [], 0
    for n in lens:
        out.append(data[pos : pos + n])
        pos += n
    return out


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2000),
    insert=st.binary(min_size=1, max_size=16),
)
def test_insert_near_start_changes_few_chunks(seed: int, offset: int, insert: bytes) -> None:
    sizes = (64, 256, 1024)
    old = random.Random(seed).randbytes(32768)
    new = old[:offset] + insert + old[offset:]
    before = set(_chunk_set(old, sizes))
    after = _chunk_set(new, sizes)
    changed = [c for c in after if c not in before]
    # The chunk holding the insert and at most a few more before the cuts fall
    # into step (1-2 usually; 5 at worst in 1500 random trials, about 2.7 KiB).
    assert len(changed) <= 8
    assert sum(map(len, changed)) <= 4 * sizes[2]
    assert len(after) >= 32768 // 1024


def test_chunkers_fall_into_step_where_a_zero_run_ends() -> None:
    """Chunking that starts anywhere (a window of a file, a shifted copy) cuts
    like whole-file chunking from the first cuts after a zero run on."""
    rng = random.Random(11)
    data = rng.randbytes(30000) + bytes(70000) + rng.randbytes(200000)
    sizes = (native.CDC_MIN, native.CDC_AVG, native.CDC_MAX)
    start = 100000  # first byte after the zero run

    def cuts(off: int) -> list[int]:
        out, pos = [], off
        for n in c_chunks(data[off:], *sizes)[0]:
            pos += n
            out.append(pos)
        return [c for c in out if c >= start]

    whole = cuts(0)
    assert whole[0] == start  # the run's end is a cut
    for off in (1, 7, 4095, 12345, 31000, 50000, 97000, 99000):
        got = cuts(off)
        assert got[-len(whole) + 1 :] == whole[1:] or got == whole
