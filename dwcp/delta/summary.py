"""Hierarchical manifest exchange (HDE): metadata proportional to the change.

A full manifest costs 16 bytes per non-zero 4 KiB block (4 MiB per GiB). The
sender first sends a summary: the hash tree's 1 MiB parents (16 KiB per GiB).
The receiver finds the parents it already holds in a local image, asks for
the leaves of the others only, and rebuilds the full manifest from its own
copies plus those leaves; the tree root proves the result is the sender's.

Sans-IO: the sender calls ``summary_bytes`` and ``leaves_bytes``; the receiver
drives a ``ManifestAssembler``.
"""

from __future__ import annotations

import struct

import zstandard

from dwcp.delta import native
from dwcp.delta.index import LocalIndex
from dwcp.delta.manifest import DEFAULT_MAX_IMAGE, TREE_FANOUT, Manifest
from dwcp.errors import ManifestError

_SUM = struct.Struct("<8sIQ32s16s")  # magic, block size, image size, sha256, root
SUM_MAGIC = b"DWCPSUM\x01"
_LEAF_HEAD = struct.Struct("<I")  # number of groups
FP = native.FP_BYTES


def _groups(size: int, bs: int) -> int:
    blocks = -(-size // bs)
    return -(-blocks // TREE_FANOUT)


def summary_bytes(m: Manifest) -> bytes:
    """Sender: size, digest, root and the 1 MiB parents."""
    parents = m.levels[0] if m.n_blocks else b""
    return _SUM.pack(SUM_MAGIC, m.block_size, m.size, m.sha256, m.root) + parents


def leaves_bytes(m: Manifest, groups: list[int]) -> bytes:
    """Sender: block flags and non-zero fingerprints of the requested groups."""
    n_groups = _groups(m.size, m.block_size)
    if len(groups) > n_groups or any(not 0 <= g < n_groups for g in groups):
        raise ManifestError("leaf request names groups the image does not have")
    flags = bytearray()
    fps = bytearray()
    for g in groups:
        a, b = g * TREE_FANOUT, min(m.n_blocks, (g + 1) * TREE_FANOUT)
        gf = m.flags[a:b]
        flags += gf
        for i in range(a, b):
            if not m.flags[i]:
                fps += m.fps[i * FP : (i + 1) * FP]
    packed = zstandard.ZstdCompressor(level=3).compress(bytes(flags))
    return _LEAF_HEAD.pack(len(packed)) + packed + bytes(fps)


class ManifestAssembler:
    """Receiver: from a summary, what to ask for, then the full manifest."""

    def __init__(
        self, summary: bytes, index: LocalIndex, *, max_image: int = DEFAULT_MAX_IMAGE
    ) -> None:
        if len(summary) < _SUM.size:
            raise ManifestError("manifest summary truncated")
        magic, bs, size, sha, root = _SUM.unpack_from(summary)
        if magic != SUM_MAGIC:
            raise ManifestError("not a dwcp manifest summary (bad magic)")
        if bs < 512 or bs > 1 << 20 or bs & (bs - 1) or size > max_image:
            raise ManifestError("manifest summary header is invalid or over the limits")
        n_groups = _groups(size, bs)
        parents = summary[_SUM.size :]
        if len(parents) != n_groups * FP:
            raise ManifestError(
                f"manifest summary lists {len(parents) // FP} parents, expected {n_groups}"
            )
        self.block_size, self.size, self.sha256, self.root = bs, size, sha, root
        self.n_blocks: int = -(-size // bs)
        self._index = index
        found = index.parents.lookup(parents, bytes(n_groups))
        self._found = found
        self.needed = [g for g in range(n_groups) if found.sources[g] < 0]

    def _group_blocks(self, g: int) -> int:
        return int(min(TREE_FANOUT, self.n_blocks - g * TREE_FANOUT))

    def complete(self, leaves: bytes) -> Manifest:
        """Merge local fingerprints with the sender's leaves; check against the root."""
        want_blocks = sum(self._group_blocks(g) for g in self.needed)
        if len(leaves) < _LEAF_HEAD.size:
            raise ManifestError("leaf answer truncated")
        (plen,) = _LEAF_HEAD.unpack_from(leaves)
        body = _LEAF_HEAD.size + plen
        if body > len(leaves):
            raise ManifestError("leaf answer truncated")
        try:
            packed = leaves[_LEAF_HEAD.size : body]
            if want_blocks and zstandard.frame_content_size(packed) != want_blocks:
                raise ManifestError("leaf answer's block map declares the wrong size")
            flags = (
                zstandard.ZstdDecompressor().decompress(
                    leaves[_LEAF_HEAD.size : body], max_output_size=want_blocks
                )
                if want_blocks
                else b""
            )
        except zstandard.ZstdError as exc:
            raise ManifestError(f"leaf answer is corrupt: {exc}") from exc
        if len(flags) != want_blocks or flags.translate(None, b"\x00\x01"):
            raise ManifestError("leaf answer's block map does not match the request")
        nonzero = want_blocks - flags.count(1)
        if len(leaves) - body != nonzero * FP:
            raise ManifestError("leaf answer's fingerprint count does not match its block map")
        all_flags = bytearray(self.n_blocks)
        all_fps = bytearray(self.n_blocks * FP)
        src_fps = memoryview(leaves)[body:]
        j = k = 0
        needed = set(self.needed)
        for g in range(-(-self.n_blocks // TREE_FANOUT)):
            a = g * TREE_FANOUT
            n = self._group_blocks(g)
            if g in needed:
                for i in range(a, a + n):
                    f = flags[k]
                    k += 1
                    all_flags[i] = f
                    if not f:
                        all_fps[i * FP : (i + 1) * FP] = src_fps[j * FP : (j + 1) * FP]
                        j += 1
            else:
                src = self._found.sources[g]
                local = self._index.manifests[src]
                first = self._found.offsets[g] // local.block_size
                all_flags[a : a + n] = local.flags[first : first + n]
                all_fps[a * FP : (a + n) * FP] = local.fps[first * FP : (first + n) * FP]
        m = Manifest(self.size, self.block_size, self.sha256, bytes(all_fps), bytes(all_flags))
        if m.root != self.root:
            raise ManifestError(
                "the assembled manifest does not match the sender's tree root; "
                "the sender is faulty or a local image changed since it was indexed"
            )
        return m
