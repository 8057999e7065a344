"""The HDE hash tree, computed sparsely: memory grows with the blocks that hold data.

Leaves are the blocks' fingerprints (a zero block's is 16 zero bytes); each parent
is the XXH3-128 of ``TREE_FANOUT`` children's fingerprints (fewer for the last);
levels go up to one root. A subtree of zero blocks has one value per level, so only
the nodes above data (and each level's last node) are ever computed: the result is
the same tree a dense pass over every block would build.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable

from dwcp.delta import native

TREE_FANOUT = 256
FP = native.FP_BYTES
ZERO_FP = bytes(FP)
EMPTY_ROOT = hashlib.blake2b(b"dwcp-empty-tree", digest_size=16).digest()
_BATCH = 256  # tree nodes hashed per C call


def _hash_nodes(children: bytes | bytearray, count: int) -> bytes:
    """Parents of consecutive full groups of ``TREE_FANOUT`` children (``count`` children)."""
    return native.tree_level(bytes(children[: count * FP]), TREE_FANOUT)


def _next_level(
    ids: array[int], values: bytes, n: int, zero: bytes
) -> tuple[array[int], bytes, int, bytes]:
    """One tree level up from a sparse level.

    ``ids``/``values``: the nodes that are not the all-zero subtree value ``zero``,
    always including the last node ``n - 1``. Returns the same for the parents.
    """
    n_up = -(-n // TREE_FANOUT)
    out_ids: array[int] = array("Q")
    out: list[bytes] = []
    batch = bytearray()
    batch_ids: list[int] = []

    def flush() -> None:
        if batch_ids:
            out.append(_hash_nodes(batch, len(batch_ids) * TREE_FANOUT))
            out_ids.extend(batch_ids)
            batch.clear()
            batch_ids.clear()

    i, k = 0, len(ids)
    while i < k:
        parent = ids[i] // TREE_FANOUT
        first = parent * TREE_FANOUT
        count = min(TREE_FANOUT, n - first)
        buf = bytearray(zero * count)
        while i < k and ids[i] // TREE_FANOUT == parent:
            at = (ids[i] - first) * FP
            buf[at : at + FP] = values[i * FP : (i + 1) * FP]
            i += 1
        if count == TREE_FANOUT:
            batch += buf
            batch_ids.append(parent)
            if len(batch_ids) >= _BATCH:
                flush()
        else:  # the last, partial parent
            flush()
            out.append(native.tree_level(bytes(buf), TREE_FANOUT))
            out_ids.append(parent)
    flush()
    return out_ids, b"".join(out), n_up, native.tree_level(zero * TREE_FANOUT, TREE_FANOUT)


def sparse_tree(
    n: int, runs: Iterable[tuple[int, int, int]], fps: bytes
) -> tuple[array[int], bytes, bytes]:
    """The tree over ``n`` blocks whose non-zero ones are ``runs`` (start, end, index of
        the first fingerprint in ``fps``): the sparse 1 MiB parents (ids and values: every
    parent with a non-zero block, and the last) and the root."""
    if n == 0:
        return array("Q"), b"", EMPTY_ROOT
    ids: array[int] = array("Q")
    batch = bytearray()
    out: list[bytes] = []
    cur = -1  # group being filled in ``batch`` (full groups only)
    last = (n - 1) // TREE_FANOUT
    last_buf = bytearray(FP * (n - last * TREE_FANOUT))
    for a, b, fp_at in runs:
        pos = a
        while pos < b:
            g = pos // TREE_FANOUT
            stop = min(b, (g + 1) * TREE_FANOUT)
            src = fps[(fp_at + pos - a) * FP : (fp_at + stop - a) * FP]
            at = (pos - g * TREE_FANOUT) * FP
            if g == last:
                last_buf[at : at + len(src)] = src
            else:
                if g != cur:
                    if len(batch) >= _BATCH * TREE_FANOUT * FP:
                        out.append(_hash_nodes(batch, len(batch) // FP))
                        batch.clear()
                    batch += bytes(TREE_FANOUT * FP)
                    ids.append(g)
                    cur = g
                base = len(batch) - TREE_FANOUT * FP
                batch[base + at : base + at + len(src)] = src
            pos = stop
    if batch:
        out.append(_hash_nodes(batch, len(batch) // FP))
    out.append(native.tree_level(bytes(last_buf), TREE_FANOUT))
    ids.append(last)
    parents = b"".join(out)
    # Levels above: sparse, with the all-zero subtree value of each level.
    zero = native.tree_level(ZERO_FP * TREE_FANOUT, TREE_FANOUT)
    lvl_ids, lvl, count = ids, parents, last + 1
    while count > 1:
        lvl_ids, lvl, count, zero = _next_level(lvl_ids, lvl, count, zero)
    return ids, parents, lvl[-FP:]
