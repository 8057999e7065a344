"""Hostile or damaged input: typed errors, bounded memory, no partial output."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp.cli import main
from dwcp.delta import Manifest, decode_frame, encode, make_delta, scan_image
from dwcp.delta.frames import HEADER_SIZE, MAX_FRAME_RAW
from dwcp.errors import FrameError, ManifestError
from tests.delta.conftest import make_image


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    d = tmp_path_factory.mktemp("sample")
    rng = random.Random(7)
    img = d / "img"
    img.write_bytes(make_image(rng, 300))
    frame = next(encode(img, [(0, 300 * 4096)]))
    return img, scan_image(img).to_bytes(), frame


def _mutate(data: st.DataObject, original: bytes, last: str, *, garbage_max: int) -> bytearray:
    """One hostile edit: flip a byte, truncate, replace with garbage, or ``last``
    (``header``: random header bytes; ``extend``: trailing bytes)."""
    out = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage", last]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(out) - 1))
        out[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        out = out[: data.draw(st.integers(0, len(out) - 1))]
    elif kind == "garbage":
        out = bytearray(data.draw(st.binary(max_size=garbage_max)))
    elif kind == "header":
        out[:HEADER_SIZE] = data.draw(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
    else:
        out += data.draw(st.binary(min_size=1, max_size=64))
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_frames_raise_frame_error(
    data: st.DataObject, sample: tuple[Path, bytes, bytes]
) -> None:
    frame = _mutate(data, sample[2], "header", garbage_max=256)
    try:
        pieces = decode_frame(bytes(frame))
    except FrameError:
        return
    # A change that still decodes must be one the checksum does not cover (none here).
    assert bytes(frame) == sample[2] and pieces


def test_frame_declaring_huge_output_is_refused() -> None:
    head = struct.pack("<2sBBIII Q", b"DF", 1, 1, 1, MAX_FRAME_RAW + 1, 0, 0)
    with pytest.raises(FrameError, match="limits"):
        decode_frame(head + struct.pack("<QI", 0, MAX_FRAME_RAW + 1))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_manifests_raise_manifest_error(
    data: st.DataObject, sample: tuple[Path, bytes, bytes]
) -> None:
    blob = _mutate(data, sample[1], "extend", garbage_max=512)
    try:
        m = Manifest.from_bytes(bytes(blob))
    except ManifestError:
        return
    # The only mutations that decode are ones to fields no fingerprint covers: the SHA-256
    # (caught when the image is verified) or the reserved flags.
    assert m.dense() == Manifest.from_bytes(sample[1]).dense()


def test_manifest_claiming_a_huge_image_is_refused(sample: tuple[Path, bytes, bytes]) -> None:
    blob = bytearray(sample[1])
    struct.pack_into("<Q", blob, 12, 1 << 50)  # the size field of the v2 header
    with pytest.raises(ManifestError, match="limit"):
        Manifest.from_bytes(bytes(blob))


# --- command line -------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    rng = random.Random(3)
    old = make_image(rng, 200)
    new = bytearray(old)
    new[40960:49152] = rng.randbytes(8192)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    make_delta(tmp_path / "new", [tmp_path / "old"], tmp_path / "d")
    return tmp_path / "old", tmp_path / "new", tmp_path / "d"


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_wrong_base(
    pair: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _old, new, d = pair
    out = tmp_path / "out"
    code, err = _run(["patch", str(d), "--base", str(new), "-o", str(out)], capsys)
    assert code != 0 and "not the image this delta was made against" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_cli_missing_base(
    pair: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, d = pair
    out = tmp_path / "out"
    code, err = _run(["patch", str(d), "--base", str(tmp_path / "nope"), "-o", str(out)], capsys)
    assert code != 0 and "not found" in err and not out.exists()
    code, err = _run(["patch", str(d), "-o", str(out)], capsys)
    assert code != 0 and "base image" in err and not out.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "tail"])
def test_cli_damaged_delta(
    pair: tuple[Path, Path, Path], tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old, _, d = pair
    data = bytearray(d.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[:-3]
    bad = tmp_path / "bad"
    bad.write_bytes(data)
    out = tmp_path / "out"
    code, err = _run(["patch", str(bad), "--base", str(old), "-o", str(out)], capsys)
    assert code != 0 and len(err.splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_json_last_line(
    pair: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    old, new, _ = pair
    assert main(["delta", str(new), "--base", str(old), "-o", str(tmp_path / "x"), "--json"]) == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fig["bytes_changed"] == 8192 and fig["bytes_image"] == new.stat().st_size
    assert {"bytes_zero", "bytes_copied", "bytes_written", "seconds", "sha256", "level"} <= set(fig)
    assert (
        main(
            ["patch", str(tmp_path / "x"), "--base", str(old), "-o", str(tmp_path / "y"), "--json"]
        )
        == 0
    )
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fig["verified"] is True and (tmp_path / "y").read_bytes() == new.read_bytes()


def test_hostile_plans_are_refused_quickly() -> None:
    from dwcp.delta.planner import plan_from_bytes

    # 1,000 zero-length extents for a 10-byte image.
    n = 1000
    blob = struct.pack("<QI", 10, n) + bytes(n) + bytes(8 * n) + bytes(4 * n) + bytes(8 * n)
    with pytest.raises(ManifestError):
        plan_from_bytes(blob, {})
    one = struct.pack("<QI", 10, 1) + b"\x00" + struct.pack("<Q", 11) + bytes(12)
    with pytest.raises(ManifestError, match="past the image end"):
        plan_from_bytes(one, {})


def test_zstd_bomb_in_a_manifest_is_refused(sample: tuple[Path, bytes, bytes]) -> None:
    import zstandard

    blob = bytearray(sample[1])
    head = 8 + 4 + 8 + 8 + 8 + 32 + 16 + 4  # magic bs size nonzero runs sha root runs_len
    runs_len = struct.unpack_from("<I", blob, head - 4)[0]
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    forged = blob[:head] + bomb + blob[head + runs_len :]
    struct.pack_into("<I", forged, head - 4, len(bomb))
    with pytest.raises(ManifestError):
        Manifest.from_bytes(bytes(forged))
