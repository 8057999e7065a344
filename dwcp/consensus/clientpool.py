"""Many sans-IO ``Client``s sharing one authenticated connection per replica (asyncio).

Why its own module: a node's ownership client and the benchmarks need only this
side of the binding; the replica server lives in ``dwcp.consensus.net``. The
requests of one event-loop turn leave in one write per replica, and a batch's
REPLIES is verified once for all the clients it answers.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterable, Sequence

from dwcp.consensus.actions import Action, Broadcast, Completed, Send
from dwcp.consensus.client import Client
from dwcp.consensus.conn import Endpoint, FrameProtocol, Link
from dwcp.consensus.handshake import ROLE_CLIENTS, DialerHandshake
from dwcp.consensus.messages import Codec, Replies, Reply
from dwcp.consensus.netconfig import NetConfig
from dwcp.errors import AuthenticationError, ConsensusError, ProtocolError
from dwcp.identity import NodeKey


class ClientPool(Endpoint):
    """Many sans-IO ``Client``s (one per key) sharing one connection per replica."""

    def __init__(self, net: NetConfig, keys: Sequence[NodeKey]) -> None:
        self.net = net
        cfg = net.cluster
        self.limit = cfg.max_message_bytes + 64
        self.codec = Codec(cfg)
        self.clients = [Client(cfg, k, codec=self.codec) for k in keys]
        self.by_index = {c.index: c for c in self.clients}
        self._waiters: dict[int, asyncio.Future[Completed]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self.addresses = net.addresses
        self.links = {
            j: Link(self, j, functools.partial(DialerHandshake, cfg, keys, ROLE_CLIENTS, j))
            for j in range(cfg.n)
        }
        self._out: dict[int, list[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bad_signatures = 0

    def _ev(self) -> asyncio.AbstractEventLoop:
        # Cached: asyncio.get_running_loop() costs a getpid() per call on Python 3.11.
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
        return loop

    async def start(self, timeout: float = 10.0) -> None:
        """Dial every replica; return once all are connected (or raise after ``timeout``)."""
        for link in self.links.values():
            link.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while any(link.proto is None for link in self.links.values()):
            if loop.time() > end:
                raise ConsensusError(
                    "could not connect to every replica; check that they run and the "
                    "addresses in the cluster file"
                )
            await asyncio.sleep(0.01)

    def _perform(self, client: Client, actions: list[Action]) -> None:
        # Frames queued in one loop turn (many clients' requests) leave in one write per replica.
        out = self._out
        if not out:
            self._ev().call_soon(self._flush)
        for a in actions:
            if isinstance(a, Send):
                out.setdefault(a.to, []).append(a.data)
            elif isinstance(a, Broadcast):
                for j in self.links:
                    out.setdefault(j, []).append(a.data)
        old = self._timers.pop(client.index, None)
        if old is not None:
            old.cancel()
        dl = client.next_deadline()
        if dl is not None:
            self._timers[client.index] = self._ev().call_at(dl, self._on_timer, client)

    def _flush(self) -> None:
        out, self._out = self._out, {}
        for j, frames in out.items():
            self.links[j].send(frames)

    def _on_timer(self, client: Client) -> None:
        self._timers.pop(client.index, None)
        self._perform(client, client.tick(self._ev().time()))

    def on_frame(self, proto: FrameProtocol, data: bytes) -> None:
        try:
            s = self.codec.decode(data)
        except ProtocolError:
            return
        msg = s.msg
        if isinstance(msg, Reply):
            indices: Iterable[int] = (msg.client,)
        elif isinstance(msg, Replies):
            indices = dict.fromkeys(c for c, _, _ in msg.entries)
        else:
            return
        # Only clients still waiting (the first f+1 replies complete them).
        waiting = [c for c in map(self.by_index.get, indices) if c is not None and c.busy]
        if len(waiting) > 1:
            # Checked once here: a forged REPLIES naming all our clients must not cost a
            # verification per client (a valid one is then found in the shared codec's cache).
            try:
                self.codec.verify(s)
            except AuthenticationError:
                self.bad_signatures += 1
                return
        now = self._ev().time()
        for client in waiting:
            for ev in client.receive_decoded(s, now):
                waiter = self._waiters.pop(client.index, None)
                timer = self._timers.pop(client.index, None)
                if timer is not None:
                    timer.cancel()
                if waiter is not None and not waiter.done():
                    waiter.set_result(ev)

    async def request(
        self, op: bytes, client: int = 0, *, timeout: float | None = None
    ) -> Completed:
        """Submit ``op`` as ``clients[client]`` and wait for f + 1 matching replies.

        After ``timeout`` seconds raise ``ConsensusError`` and stop waiting (the request
        may still commit later; PBFT executes it at most once). Timestamps follow the
        wall clock, so they keep rising across restarts of a long-lived client.
        """
        c = self.clients[client]
        loop = self._ev()
        fut: asyncio.Future[Completed] = loop.create_future()
        self._waiters[c.index] = fut
        c.advance_timestamp(int(time.time() * 1_000_000))
        self._perform(c, c.request(op, loop.time()))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise ConsensusError(
                f"no f+1 matching replies within {timeout:g} s: fewer than 2f+1 replicas "
                "are reachable or agree; check 'dwcp status' on the replica nodes"
            ) from None
        finally:
            if not fut.done():
                self._waiters.pop(c.index, None)
                timer = self._timers.pop(c.index, None)
                if timer is not None:
                    timer.cancel()
                c.abandon()

    def close(self) -> None:
        for link in self.links.values():
            link.stop()
        for t in self._timers.values():
            t.cancel()
