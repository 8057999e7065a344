"""Two session cores joined in memory over real QUIC connections, in virtual time.

As aioquic's own ``client_and_server`` tests: each connection pair is two
``DwcpQuicConnection`` objects whose datagrams move through a modelled link
(rate, one-way delay, seeded loss) when ``run`` advances a virtual clock.
Nothing sleeps; a test is as fast as the Python work it does.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from aioquic.quic import events as qe

from dwcp import wire
from dwcp.identity import NodeKey
from dwcp.transport.config import TransportConfig
from dwcp.transport.core import CONTROL_STREAM, SessionCore
from dwcp.transport.events import SessionEvent
from dwcp.transport.quic import DwcpQuicConnection
from dwcp.transport.tls import make_configuration

CLIENT_ADDR = ("10.0.0.1", 1111)
SERVER_ADDR = ("10.0.0.2", 2222)


@dataclass
class Link:
    """One direction: a FIFO at ``rate_bps`` then ``delay`` seconds; drops at random, and
    drops datagrams larger than ``mtu`` less IPv6 + UDP headers (path MTU probes)."""

    rate_bps: float = 100e6
    delay: float = 0.010
    loss: float = 0.0
    free_at: float = 0.0
    mtu: int = 1500


@dataclass
class Side:
    """One end of the session: its core, its QUIC connections and the events it saw."""

    core: SessionCore
    quics: list[DwcpQuicConnection] = field(default_factory=list)
    events: list[SessionEvent] = field(default_factory=list)
    decoders: dict[int, wire.FrameDecoder] = field(default_factory=dict)  # before Hello

    def take(self) -> list[SessionEvent]:
        out, self.events = self.events, []
        return out


class MemoryPair:
    """A client and a server session core with ``connections`` QUIC connections each."""

    def __init__(
        self,
        config: TransportConfig | None = None,
        *,
        server_config: TransportConfig | None = None,
        connections: int = 1,
        link: Callable[[], Link] = Link,
        seed: int = 1,
    ) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        config = config or TransportConfig()
        ka, kb = NodeKey.generate(), NodeKey.generate()
        self.client = Side(SessionCore(config, is_client=True))
        self.server = Side(SessionCore(server_config or config, is_client=False))
        self._queue: list[tuple[float, int, DwcpQuicConnection, bytes]] = []
        self._seq = itertools.count()
        self._links: dict[int, Link] = {}
        self._started: set[int] = set()
        for _ in range(connections):
            cq = DwcpQuicConnection(
                configuration=make_configuration(ka, is_client=True), trusted=[kb.public]
            )
            sq = DwcpQuicConnection(
                configuration=make_configuration(kb, is_client=False),
                trusted=[ka.public],
                original_destination_connection_id=cq.original_destination_connection_id,
            )
            self._links[id(cq)] = link()
            self._links[id(sq)] = link()
            self.client.quics.append(cq)
            self.server.quics.append(sq)
            cq.connect(SERVER_ADDR, now=self.now)
            self._started.add(id(cq))
        self._peer = {
            id(q): p
            for c, s in zip(self.client.quics, self.server.quics, strict=True)
            for q, p in ((c, s), (s, c))
        }
        self.run(until=lambda: all(q.peer_key is not None for q in self.server.quics))
        for index, cq in enumerate(self.client.quics):
            assert self.client.core.add_connection(cq) == index
            cq.send_stream_data(CONTROL_STREAM, wire.encode(wire.Hello(b"s" * 16, index, 8, 1)))
            self.client.events += self.client.core.adopt_control(index, wire.FrameDecoder())
        self.run(until=lambda: len(self.server.core.conns) == connections)

    # --- moving datagrams -----------------------------------------------------

    def _side(self, quic: DwcpQuicConnection) -> Side:
        return self.client if quic in self.client.quics else self.server

    def _transmit(self, quic: DwcpQuicConnection) -> None:
        if id(quic) not in self._started:
            return  # a server connection has no network path before its first datagram
        link = self._links[id(quic)]
        peer = self._peer[id(quic)]
        for data, _addr in quic.datagrams_to_send(now=self.now):
            if len(data) > link.mtu - 48:
                continue
            start = max(self.now, link.free_at)
            link.free_at = start + len(data) * 8 / link.rate_bps
            if link.loss and self.rng.random() < link.loss:
                continue
            at = link.free_at + link.delay
            heapq.heappush(self._queue, (at, next(self._seq), peer, data))

    def _dispatch(self, quic: DwcpQuicConnection) -> None:
        side = self._side(quic)
        index = side.quics.index(quic)
        event = quic.next_event()
        while event is not None:
            if isinstance(event, qe.StreamDataReceived):
                self._data(side, index, event.stream_id, event.data, event.end_stream)
            elif isinstance(event, qe.StreamReset):
                side.events += side.core.reset(index, event.stream_id)
            event = quic.next_event()

    def _data(self, side: Side, index: int, stream_id: int, data: bytes, fin: bool) -> None:
        if side is self.server and index >= len(side.core.conns):
            # The server's greeter: a connection joins the core once its Hello is read.
            assert stream_id == CONTROL_STREAM
            decoder = side.decoders.setdefault(index, wire.FrameDecoder())
            frames = decoder.feed(data, limit=1)
            if frames:
                assert isinstance(frames[0], wire.Hello)
                assert side.core.add_connection(side.quics[index]) == index
                side.events += side.core.adopt_control(index, decoder)
            return
        side.events += side.core.receive(index, stream_id, data, fin)

    def _transmit_all(self) -> None:
        for q in [*self.client.quics, *self.server.quics]:
            self._transmit(q)

    def _advance(self) -> bool:
        """Deliver the next datagram or fire the next timer; False if there is neither."""
        quics = [*self.client.quics, *self.server.quics]
        timers = [(t, q) for q in quics if (t := q.get_timer()) is not None]
        next_datagram = self._queue[0][0] if self._queue else None
        next_timer = min(timers, key=lambda x: x[0]) if timers else None
        if next_datagram is None and next_timer is None:
            return False
        if next_timer is not None and (next_datagram is None or next_timer[0] < next_datagram):
            # A microsecond past the timer, as a real clock would be: aioquic's loss timer
            # recomputes the same float deadline when fired exactly at it.
            self.now = max(self.now, next_timer[0] + 1e-6)
            next_timer[1].handle_timer(now=self.now)
            self._dispatch(next_timer[1])
            return True
        at, _, quic, data = heapq.heappop(self._queue)
        self.now = max(self.now, at)
        self._started.add(id(quic))
        quic.receive_datagram(data, SERVER_ADDR if quic.is_client else CLIENT_ADDR, now=self.now)
        self._dispatch(quic)
        return True

    def step(self) -> bool:
        """Send what is ready, then advance to the next datagram or timer."""
        self._transmit_all()
        return self._advance()

    def run(
        self, until: Callable[[], bool] | None = None, *, seconds: float = 30.0, steps: int = 10**6
    ) -> bool:
        """Step until ``until()`` holds (True), or ``seconds`` of virtual time pass (False).

        With no ``until``, runs until the network is quiet: nothing in flight and
        no timer due within a second (the idle timer excepted).
        """
        deadline = self.now + seconds
        for _ in range(steps):
            if until is not None and until():
                return True
            self._transmit_all()
            if until is None and not self._queue and self._timers_far():
                return True
            if not self._advance() or self.now > deadline:
                return until() if until is not None else False
        raise AssertionError(f"no end after {steps} steps")

    def _timers_far(self) -> bool:
        soon = self.now + 1.0
        quics = [*self.client.quics, *self.server.quics]
        return all((t := q.get_timer()) is None or t > soon for q in quics)
