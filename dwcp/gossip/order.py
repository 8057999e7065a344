"""Who an ASS member talks to next: the shuffled round-robin probe order and random picks.

Why apart from ``swim``: choosing peers is pure bookkeeping over the member table (no
messages, no timers), so it is read and tested on its own; the core only asks "next
probe target" and "k random members".
"""

from __future__ import annotations

from collections.abc import Callable

from dwcp.gossip.messages import ALIVE, DEAD, LEFT, SUSPECT
from dwcp.gossip.records import Member


class ProbeOrder:
    """SWIM's round-robin over a random permutation of the members, reshuffled each lap
    (the worst-case detection bound of the paper), plus uniform random picks."""

    __slots__ = ("_order", "_pos", "names")

    def __init__(self) -> None:
        self.names: list[str] = []
        self._order: list[str] = []
        self._pos = 0

    def reset(self, names: list[str]) -> None:
        """New membership: ``names`` sorted; the current lap is abandoned."""
        self.names = names
        self._order, self._pos = [], 0

    def next(self, members: dict[str, Member], rand: Callable[[], float]) -> str | None:
        """The next alive or suspect member of the lap, shuffled one Fisher-Yates step per
        probe (a full shuffle up front cost the simulator 40% of a 2,000-member run)."""
        for _ in range(2):
            order = self._order
            left = len(order) - self._pos
            while left > 0:
                i = self._pos
                j = i + int(rand() * left)
                name = order[j]
                order[j], order[i] = order[i], name
                self._pos = i + 1
                left -= 1
                m = members.get(name)
                if m is not None and m.state <= SUSPECT:
                    return name
            self._order, self._pos = list(self.names), 0
        return None

    def sample(
        self,
        k: int,
        exclude: str,
        members: dict[str, Member],
        rand: Callable[[], float],
        *,
        alive_only: bool,
        dead_since: float,
    ) -> list[str]:
        """Up to ``k`` distinct random members: alive ones (for indirect probes) or, for
        gossip, alive, suspect and ones dead since ``dead_since`` (so a live one hears it
        and refutes)."""
        names = self.names
        found: list[str] = []
        if not names or k <= 0:
            return found
        for _ in range(3 * k + 3):
            n = names[int(rand() * len(names))]
            if n == exclude or n in found:
                continue
            m = members[n]
            if alive_only:
                if m.state != ALIVE:
                    continue
            elif m.state == LEFT or (m.state == DEAD and m.since < dead_since):
                continue
            found.append(n)
            if len(found) >= k:
                break
        return found
