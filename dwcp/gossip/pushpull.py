"""Anti-entropy of member state for the ASS core (memberlist's push-pull), sans-IO.

Why: gossip spends each update on a bounded number of retransmits (4 x log10 n), so a
member that was deaf while a refutation's epidemic passed (a slow receiver, a lossy
spell) never hears it again and, with its own suspicion unconfirmed, declares a live
member dead. Every ``interval(base, n)`` seconds a member sends its whole member table to
one random alive member (``PUSH``), which merges it and answers with its own (``PULL``).
Merging uses the ordinary update rules (a newer incarnation wins; at equal incarnation
dead beats suspect beats alive), so a member that finds itself suspected or dead in the
peer's view refutes.

Bounds: a table travels in chunks of at most ``MAX_UPDATES`` entries and ``chunk_bytes``
encoded bytes; every chunk is merged on its own (entries are idempotent), so a receiver
never buffers a table and a lost chunk costs only its entries. A chunk is checked before
any entry is used (``check_chunk``): its index and count, duplicate names, and its size
in entries; a hostile or garbled one raises ``ProtocolError`` and the core counts it.
Plain SWIM (``SwimConfig(lifeguard=False)``) runs no push-pull, as in the Lifeguard
paper's baseline.
"""

from __future__ import annotations

import math

from dwcp.errors import ProtocolError
from dwcp.gossip.messages import MAX_UPDATES, PULL, PUSH, Message, Update, update_size

MAX_CHUNKS = 255
"""Chunks per table: 255 x 255 entries, far above any fleet this core is sized for."""


def interval(base: float, n: int) -> float:
    """memberlist's ``pushPullScale``: ``base`` up to 32 members, then one more ``base``
    per doubling, so the fleet's push-pull traffic grows as n log n, not n^2."""
    if n <= 32:
        return base
    return base * (math.ceil(math.log2(n) - math.log2(32)) + 1)


def seq_of(exchange: int, index: int, count: int) -> int:
    """A chunk's sequence field: exchange id, chunk index and chunk count in one integer."""
    return (exchange << 16) | (index << 8) | count


def chunk_fields(seq: int) -> tuple[int, int, int]:
    return seq >> 16, (seq >> 8) & 0xFF, seq & 0xFF


def chunks(kind: int, exchange: int, table: list[Update], chunk_bytes: int) -> list[Message]:
    """Split ``table`` into messages of at most ``MAX_UPDATES`` entries and ``chunk_bytes``."""
    parts: list[list[Update]] = []
    cur: list[Update] = []
    size = 0
    fixed = update_size((0, "", 0, ""))
    for u in table:
        s = fixed + len(u[1]) + len(u[3])
        if cur and (len(cur) >= MAX_UPDATES or size + s > chunk_bytes):
            parts.append(cur)
            cur, size = [], 0
        cur.append(u)
        size += s
    if cur or not parts:
        parts.append(cur)
    if len(parts) > MAX_CHUNKS:
        raise ProtocolError(
            f"a member table of {len(table)} entries needs over {MAX_CHUNKS} chunks; "
            "raise push_pull_chunk_bytes"
        )
    count = len(parts)
    return [Message(kind, seq_of(exchange, i, count), "", p) for i, p in enumerate(parts)]


def check_chunk(msg: Message, members: int) -> None:
    """Raise ``ProtocolError`` for a chunk no honest member sends (see the module doc)."""
    if msg.kind not in (PUSH, PULL):
        raise ProtocolError(f"message kind {msg.kind} is not a push-pull chunk")
    _, index, count = chunk_fields(msg.seq)
    if count == 0 or index >= count:
        raise ProtocolError(f"push-pull chunk {index} of {count}: not a valid chunk number")
    ups = msg.updates
    if len(ups) > MAX_UPDATES or len(ups) > members + 1:
        raise ProtocolError(
            f"push-pull chunk of {len(ups)} entries for a fleet of {members + 1} members"
        )
    if len({u[1] for u in ups}) != len(ups):
        raise ProtocolError("push-pull chunk names a member twice")
