"""QEMU's N migration connections, each on its own relay channel, re-made in accept order.

With multifd QEMU opens a main connection and then ``multifd-channels`` more to the same
address; QEMU 7.2's destination takes the *first connection it accepts* as the main one
(8.0 peeks a magic instead), so the destination relay must connect to QEMU in the order
the source relay accepted, whatever order the channels arrive in. Each accepted
connection gets a sequence number (``seq``) in its channel header; the destination makes
connection ``seq`` only after ``seq - 1`` is connected (``Turns``), within a deadline.

The source spreads the channels over ``lanes``: separate dwcp sessions, each its own QUIC
connection with its own congestion controller, so one lost packet stalls one channel,
not all (``lane_of``: the main channel on the primary session, with the control channel
and the disk's NBD connection; the multifd channels round-robin over the rest).
Buffering stays bounded per channel: ``relay.pipe`` waits for each channel's drain.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from dwcp.errors import DwcpError, VmError
from dwcp.live.relay import Counter, pipe

TURN_SECONDS = 30.0  # longest a connection waits for the ones accepted before it

# opens the channel for one connection: (seq) -> (reader, writer), header already sent
Opener = Callable[[int], Awaitable[tuple[Any, Any]]]


def lane_of(seq: int, lanes: int) -> int:
    """Which session carries connection ``seq``: 0 (the primary) for the main one,
    the multifd ones round-robin over lanes 1.. (all on 0 when there is one lane)."""
    if lanes <= 1 or seq == 0:
        return 0
    return 1 + (seq - 1) % (lanes - 1)


class Turns:
    """Destination side: lets connection ``seq`` connect once ``seq - 1`` has."""

    def __init__(self) -> None:
        self.next = 0
        self._changed = asyncio.Condition()

    async def wait(self, seq: int, timeout: float = TURN_SECONDS) -> None:
        try:
            async with asyncio.timeout(timeout), self._changed:
                while self.next < seq:
                    await self._changed.wait()
        except TimeoutError:
            raise VmError(
                f"the relay's connection {seq} waited {timeout:g} s for connection "
                f"{self.next} (the source's QEMU or the link stalled); re-run the migration"
            ) from None

    async def done(self, seq: int) -> None:
        """Connection ``seq`` is made (or failed: the next ones may go on and fail fast)."""
        async with self._changed:
            self.next = max(self.next, seq + 1)
            self._changed.notify_all()


class Fanout:
    """Source side: a unix-server callback giving each QEMU connection the next ``seq``
    and its own channel from ``opener``; ``tasks`` collects the relays for cancelling."""

    def __init__(
        self, opener: Opener, counter: Counter, tasks: list[Any], packed: bool = True
    ) -> None:
        self.opener = opener
        self.packed = packed  # False: QEMU compresses (multifd zstd), the relay only copies
        self.counter = counter
        self.tasks = tasks
        self.accepted = 0

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seq = self.accepted  # before any await: the accept order
        self.accepted += 1
        self.tasks.append(asyncio.current_task())
        try:
            cr, cw = await self.opener(seq)
            await pipe(r, w, cr, cw, self.counter, packed="b" if self.packed else None)
        except (DwcpError, OSError):
            w.close()


async def connect_in_turn(
    turns: Turns | None, seq: int, connect: Callable[[], Awaitable[tuple[Any, Any]]]
) -> tuple[Any, Any]:
    """Destination side: ``connect`` (to QEMU's socket) once the earlier ones have."""
    if turns is None:
        return await connect()
    try:
        await turns.wait(seq)
        return await connect()
    finally:
        await turns.done(seq)


async def relay_in(
    chan_r: Any,
    chan_w: Any,
    turns: Turns | None,
    seq: int,
    connect: Callable[[], Awaitable[tuple[Any, Any]]],
    packed: bool = True,
) -> None:
    """One channel out to QEMU's socket, connected in turn; bytes relayed both ways."""
    try:
        r, w = await connect_in_turn(turns, seq, connect)
    except (DwcpError, OSError):
        with contextlib.suppress(Exception):
            chan_w.close()
        raise
    await pipe(chan_r, chan_w, r, w, Counter(), packed="a" if packed else None)
