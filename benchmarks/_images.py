"""Realistic disk images for the delta and migration benchmarks, built and cached.

An ext4 image filled from system files (``mkfs.ext4 -d``; binaries, headers,
docs and Python's stdlib, about 58% full like the research image) and modified
copies made deterministically from a seed:

- ``A``: 5% of the 4 KiB blocks overwritten with new data, scattered uniformly;
- ``B``: 5% of the blocks overwritten in 256 KiB runs;
- ``C``: 7 bytes inserted at 1 MiB (everything after it shifts).

New data comes from shared libraries (``/usr/lib/<triplet>``) that are not in the
image: real, compressible bytes, each 4 KiB block non-zero, unique and absent
from the image, so the ground truth (changed bytes) is exact. Images are cached
in a work directory (``bench-data/`` is git-ignored) and reused when
``meta.json`` matches the parameters. Usage::

    from _images import ensure_images
    images = ensure_images(Path("bench-data"), size=1 << 30, seed=1)
    images.base, images.cases["A"].path, images.cases["A"].changed_bytes
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash
import zstandard

BLOCK = 4096
RUN = 256 * 1024  # clustered writes (case B)
CHANGE_FRACTION = 0.05
INSERT_AT = 1 << 20  # case C
INSERT = b"dwcp+7!"  # 7 bytes
FILL = 0.58  # share of the image filled with files, as in the research image
FORMAT = 3  # bump when the way images are built changes

# Image contents, in order; the first directories fill the image.
SOURCES = ["/usr/bin", "/usr/include", "/usr/share/doc", *sorted(glob.glob("/usr/lib/python3.*"))]
FIXED_UUID = "6477637a-4844-4500-8000-000000000001"

Log = Callable[[str], None]


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Case:
    """One modified image and its ground truth."""

    name: str
    path: Path
    description: str
    changed_bytes: int  # bytes that differ from the base (inserted bytes for C)
    changed_zstd1: int  # the changed bytes compressed with zstd -1 in one stream


@dataclass(frozen=True)
class ImageSet:
    base: Path
    size: int
    files_bytes: int
    cases: dict[str, Case]


def _walk_files(roots: list[str]) -> Iterator[Path]:
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                yield Path(dirpath) / name


def _stage(stage: Path, budget: int) -> tuple[int, int]:
    """Hard-link (or copy) system files into ``stage`` up to ``budget`` bytes."""
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    total = count = 0
    for src in _walk_files(SOURCES):
        try:
            st = src.lstat()
        except OSError:
            continue
        dst = stage / src.relative_to("/")
        if src.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dst)
            count += 1
            continue
        if not src.is_file() or not os.access(src, os.R_OK):
            continue
        if total + st.st_size > budget:
            if total >= budget * 0.98:
                break
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        total += st.st_size
        count += 1
    return total, count


def build_base(work: Path, size: int, log: Log = _log_stderr) -> tuple[Path, int]:
    """Build ``work/base.img``: ``size`` bytes of ext4 holding system files."""
    work.mkdir(parents=True, exist_ok=True)
    img = work / "base.img"
    stage = work / "stage"
    log(f"building {size >> 20} MiB ext4 image from system files (once, cached in {work})")
    files_bytes, count = _stage(stage, int(size * FILL))
    tmp = img.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
    inodes = max(4096, int(count * 1.3) + 1024)
    cmd = ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-N", str(inodes), "-U", FIXED_UUID]
    cmd += ["-E", f"hash_seed={FIXED_UUID},root_owner=0:0", "-d", str(stage), str(tmp)]
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
    subprocess.run(cmd, check=True, env=env)
    shutil.rmtree(stage)
    os.replace(tmp, img)
    return img, files_bytes


def _block_set(img: Path) -> set[bytes]:
    """XXH3-128 of every 4 KiB block of ``img``."""
    out = set()
    with open(img, "rb") as f:
        while chunk := f.read(BLOCK * 1024):
            mv = memoryview(chunk)
            for off in range(0, len(mv), BLOCK):
                out.add(xxhash.xxh3_128_digest(mv[off : off + BLOCK]))
    return out


def _new_blocks(n: int, exclude: set[bytes]) -> list[bytes]:
    """``n`` unique, non-zero 4 KiB blocks of library code that the image lacks."""
    triplet = sysconfig.get_config_var("MULTIARCH") or ""
    roots = [f"/usr/lib/{triplet}"] if triplet else []
    roots += ["/usr/lib", "/usr/share", "/usr/local"]
    seen = set(exclude)
    out: list[bytes] = []
    zero = bytes(BLOCK)
    for path in _walk_files(roots):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for off in range(0, len(data) - BLOCK + 1, BLOCK):
            blk = data[off : off + BLOCK]
            if blk == zero:
                continue
            key = xxhash.xxh3_128_digest(blk)
            if key in seen:
                continue
            seen.add(key)
            out.append(blk)
            if len(out) == n:
                return out
    raise RuntimeError(f"found only {len(out)} of {n} new 4 KiB blocks on this system")


def _overwrite(base: Path, out: Path, writes: list[tuple[int, bytes]]) -> None:
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(base, tmp)
    with open(tmp, "r+b") as f:
        for off, data in writes:
            f.seek(off)
            f.write(data)
    os.replace(tmp, out)


def _insert(base: Path, out: Path, at: int, data: bytes) -> None:
    tmp = out.with_suffix(".tmp")
    with open(base, "rb") as src, open(tmp, "wb") as dst:
        dst.write(src.read(at))
        dst.write(data)
        shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, out)


def _zstd1(parts: list[bytes]) -> int:
    return len(zstandard.ZstdCompressor(level=1).compress(b"".join(parts)))


def make_cases(base: Path, work: Path, seed: int, log: Log = _log_stderr) -> dict[str, Case]:
    """Write A.img, B.img and C.img next to ``base`` (deterministic for a seed)."""
    size = base.stat().st_size
    nblocks = size // BLOCK
    nchange = int(nblocks * CHANGE_FRACTION)
    log(f"making modified copies (seed {seed}): {nchange} new 4 KiB blocks each")
    pool = _new_blocks(2 * nchange, _block_set(base))
    rng = random.Random(seed)

    # A: scattered uniformly.
    idx_a = sorted(rng.sample(range(nblocks), nchange))
    writes_a = [(i * BLOCK, pool[k]) for k, i in enumerate(idx_a)]
    _overwrite(base, work / "A.img", writes_a)

    # B: whole 256 KiB runs at random aligned slots, the same share of blocks.
    per_run = RUN // BLOCK
    nruns = max(1, nchange // per_run)
    slots = sorted(rng.sample(range(size // RUN), nruns))
    fresh = iter(pool[nchange:])
    writes_b = [(s * RUN + j * BLOCK, next(fresh)) for s in slots for j in range(per_run)]
    _overwrite(base, work / "B.img", writes_b)

    # C: 7 bytes inserted at 1 MiB.
    _insert(base, work / "C.img", INSERT_AT, INSERT)

    return {
        "A": Case(
            "A",
            work / "A.img",
            f"5% of 4 KiB blocks rewritten, scattered ({len(writes_a)} blocks)",
            len(writes_a) * BLOCK,
            _zstd1([d for _, d in writes_a]),
        ),
        "B": Case(
            "B",
            work / "B.img",
            f"5% of blocks rewritten in 256 KiB runs ({nruns} runs)",
            len(writes_b) * BLOCK,
            _zstd1([d for _, d in writes_b]),
        ),
        "C": Case(
            "C",
            work / "C.img",
            "7 bytes inserted at 1 MiB (the rest shifts)",
            len(INSERT),
            _zstd1([INSERT]),
        ),
    }


def ensure_images(work: Path, size: int, seed: int, log: Log = _log_stderr) -> ImageSet:
    """The base image and its modified copies, built once per (size, seed)."""
    work = work / f"hde-{size >> 20}m-s{seed}"
    meta_path = work / "meta.json"
    params = {"format": FORMAT, "size": size, "seed": seed, "sources": SOURCES}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        paths = [work / "base.img"] + [work / f"{c}.img" for c in "ABC"]
        if meta.get("params") == params and all(p.exists() for p in paths):
            cases = {k: Case(**{**v, "path": Path(v["path"])}) for k, v in meta["cases"].items()}
            return ImageSet(work / "base.img", size, meta["files_bytes"], cases)
    base, files_bytes = build_base(work, size, log)
    cases = make_cases(base, work, seed, log)
    meta = {
        "params": params,
        "files_bytes": files_bytes,
        "cases": {k: {**asdict(c), "path": str(c.path)} for k, c in cases.items()},
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return ImageSet(base, size, files_bytes, cases)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()
