"""The queue of updates to piggyback (memberlist's TransmitLimitedQueue, simplified).

One entry per member: a newer update about a member replaces the older one, so the queue
never holds more than one update per member (consul #9927's queue of 160k intents cannot
happen). Each update rides on at most ``limit`` messages, fewest-sent and newest first.
"""

from __future__ import annotations

from dwcp.gossip.messages import Update, update_size


class BroadcastQueue:
    __slots__ = ("_entries", "_next", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: dict[str, list[object]] = {}  # name -> [transmits, -order, update]
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, u: Update) -> None:
        self._next += 1
        self._entries[u[1]] = [0, -self._next, u]

    def clear(self) -> None:
        self._entries.clear()

    def pending(self, name: str) -> Update | None:
        e = self._entries.get(name)
        return None if e is None else e[2]  # type: ignore[return-value]

    def take(self, budget: int, first: Update | None = None) -> list[Update]:
        """Updates fitting in ``budget`` bytes (``first`` ahead of the rest, the buddy rule)."""
        out: list[Update] = []
        if first is not None:
            out.append(first)
            budget -= update_size(first)
        entries = self._entries
        if not entries:
            return out
        order = sorted(entries.values()) if len(entries) > 1 else list(entries.values())
        limit = self.limit
        for e in order:
            u: Update = e[2]  # type: ignore[assignment]
            if u is first:
                continue
            size = update_size(u)
            if size > budget:
                continue
            budget -= size
            out.append(u)
            sent = e[0] + 1  # type: ignore[operator]
            if sent >= limit:
                del entries[u[1]]
            else:
                e[0] = sent
            if budget < 16:
                break
        return out
