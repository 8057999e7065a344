"""Fuzz target for every decoder that reads bytes from outside (HDE).

Run with atheris for coverage-guided fuzzing (``pip install atheris``):

    python tests/fuzz_decoders.py -max_total_time=300

Each input is tried as a data frame, a manifest, a manifest summary and leaf
answer, a plan and a delta file; only ``dwcp.errors.PeerError`` may come out.
``tests/delta/test_fuzz.py`` runs the same target over generated inputs in CI.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import sys
from pathlib import Path

from dwcp.delta import LocalIndex, Manifest, ManifestAssembler, SummaryHeader, decode_frame
from dwcp.delta.deltafile import _frames
from dwcp.delta.planner import plan_from_bytes
from dwcp.errors import PeerError

_EMPTY = LocalIndex()


def _assemble(data: bytes) -> None:
    """``data`` as the summary and leaves pieces of an offer whose counts it also picks."""
    size, nonzero, entries = struct.unpack("<QII", data[:16].ljust(16, b"\0"))
    h = SummaryHeader(size % (1 << 40), 4096, nonzero, min(nonzero, 16), entries, bytes(16))
    asm = ManifestAssembler(h, _EMPTY, summary_sha256=hashlib.sha256(data[16:]).digest())
    asm.feed_summary(data[16:])
    asm.end_summary()
    asm.feed_leaves(data[16:])
    asm.complete()


def one_input(data: bytes) -> None:
    """Feed ``data`` to each decoder; anything but a PeerError is a bug."""
    decoders = (
        lambda: decode_frame(data),
        lambda: Manifest.from_bytes(data),
        lambda: _assemble(data),
        lambda: plan_from_bytes(data, {0: Path(__file__)}),
        lambda: list(_frames(io.BytesIO(data))),
    )
    for decode in decoders:
        with contextlib.suppress(PeerError):
            decode()


if __name__ == "__main__":  # pragma: no cover - needs atheris
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
