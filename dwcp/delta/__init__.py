"""Hierarchical delta encoding (HDE): find what a destination already has, send the rest.

Aligned 4 KiB blocks fingerprinted with XXH3-128 in C (zero blocks elided)
are the primary matcher, grouped in a hash tree; FastCDC chunks are the
fallback for data that moved. Missing data travels in zstd batches of
>= 1 MiB; the receiver rebuilds into a temp file, verifies the whole-image
SHA-256, fsyncs and renames.

Typical flow: ``scan_image`` (sender) -> ``Manifest`` -> ``plan`` against an
``ImageIndex`` (receiver) -> optionally ``chunk_list``/``refine`` -> ``encode``
``Plan.missing`` (sender) -> ``Rebuilder.feed`` and ``finish`` (receiver).
"""

from dwcp.delta.deltafile import DeltaStats, PatchStats, apply_delta, make_delta
from dwcp.delta.frames import decode as decode_frame
from dwcp.delta.frames import encode
from dwcp.delta.index import ImageIndex, ImageRecord, LocalIndex
from dwcp.delta.manifest import (
    BLOCK_SIZE,
    Manifest,
    ManifestBuilder,
    content_id,
    image_sha256,
    scan_image,
)
from dwcp.delta.planner import Extent, Plan, chunk_list, plan, refine
from dwcp.delta.rebuild import Rebuilder
from dwcp.delta.summary import (
    ManifestAssembler,
    SummaryHeader,
    leaves_parts,
    need_parts,
    summary_parts,
    with_sha256,
)

__all__ = [
    "BLOCK_SIZE",
    "DeltaStats",
    "Extent",
    "ImageIndex",
    "ImageRecord",
    "LocalIndex",
    "Manifest",
    "ManifestAssembler",
    "ManifestBuilder",
    "PatchStats",
    "Plan",
    "Rebuilder",
    "SummaryHeader",
    "apply_delta",
    "chunk_list",
    "content_id",
    "decode_frame",
    "encode",
    "image_sha256",
    "leaves_parts",
    "make_delta",
    "need_parts",
    "plan",
    "refine",
    "scan_image",
    "summary_parts",
    "with_sha256",
]
