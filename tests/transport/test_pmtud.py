"""Path MTU discovery (dwcp.transport.pmtud) against an unmodified aioquic peer, in memory.

Each test joins a ``DwcpQuicConnection`` and a plain aioquic ``QuicConnection`` (both
directions of who is the client) and moves datagrams between them in virtual time,
dropping those larger than the path MTU as a DF-marked datagram would be.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived

from dwcp.identity import NodeKey
from dwcp.transport import aio, pmtud
from dwcp.transport.quic import DwcpQuicConnection
from dwcp.transport.tls import make_configuration

CLIENT, SERVER = ("10.0.0.1", 1111), ("10.0.0.2", 2222)
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB each way


class Path:
    """A client and a server connection; ``mtu`` caps what the path delivers."""

    def __init__(
        self,
        *,
        dwcp_is_client: bool,
        mtu: int,
        congestion: str = "dwcp-bbr",
        delay: float = 0.0,
        pmtud_on: bool = True,
    ) -> None:
        ka, kb = NodeKey.generate(), NodeKey.generate()
        ccfg = make_configuration(ka, is_client=True, congestion=congestion)
        scfg = make_configuration(kb, is_client=False, congestion=congestion)
        if dwcp_is_client:
            self.client: QuicConnection = DwcpQuicConnection(
                configuration=ccfg, trusted=[kb.public]
            )
            self.server: QuicConnection = QuicConnection(
                configuration=scfg,
                original_destination_connection_id=self.client.original_destination_connection_id,
            )
        else:
            self.client = QuicConnection(configuration=ccfg)
            self.server = DwcpQuicConnection(
                configuration=scfg,
                trusted=[ka.public],
                original_destination_connection_id=self.client.original_destination_connection_id,
            )
        self.dwcp = self.client if dwcp_is_client else self.server
        assert isinstance(self.dwcp, DwcpQuicConnection)
        self.dwcp.path_mtu.enabled = pmtud_on
        self.mtu = mtu
        self.delay = delay  # one way
        self._wire: list[tuple[float, QuicConnection, bytes, tuple[str, int]]] = []
        self.now = 0.0
        self.largest = {id(self.client): 0, id(self.server): 0}  # delivered datagram sizes
        self.received = {id(self.client): bytearray(), id(self.server): bytearray()}
        self.client.connect(SERVER, now=self.now)
        self._started = {id(self.client)}

    def _move(self, src: QuicConnection, dst: QuicConnection, addr: tuple[str, int]) -> None:
        if id(src) not in self._started:
            return  # a server has no network path before its first datagram
        for data, _ in src.datagrams_to_send(now=self.now):
            if len(data) > self.mtu - pmtud.IP_UDP_OVERHEAD:
                continue  # DF: too big for the path
            self.largest[id(src)] = max(self.largest[id(src)], len(data))
            self._wire.append((self.now + self.delay, dst, data, addr))

    def _deliver(self) -> None:
        due = [w for w in self._wire if w[0] <= self.now]
        self._wire = [w for w in self._wire if w[0] > self.now]
        for _, dst, data, addr in due:
            dst.receive_datagram(data, addr, now=self.now)
            self._started.add(id(dst))
        for dst in (self.client, self.server):
            event = dst.next_event()
            while event is not None:
                if isinstance(event, StreamDataReceived):
                    self.received[id(dst)] += event.data
                event = dst.next_event()

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += 0.0005
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(now=self.now)
            self._move(self.client, self.server, CLIENT)
            self._move(self.server, self.client, SERVER)
            self._deliver()

    def exchange(self) -> float:
        """Handshake (or nothing, once connected), then 1 MiB more each way on new streams;
        the virtual seconds the data took."""
        self.run(0.05 + 3 * self.delay)
        start = self.now
        self.received = {k: bytearray() for k in self.received}
        for conn in (self.client, self.server):
            conn.send_stream_data(conn.get_next_available_stream_id(), PAYLOAD, end_stream=True)
        for _ in range(200):
            self.run(0.05)
            if all(len(r) == len(PAYLOAD) for r in self.received.values()):
                break
        assert self.received[id(self.client)] == PAYLOAD
        assert self.received[id(self.server)] == PAYLOAD
        return self.now - start


def test_datagrams_grow_on_a_loopback_sized_path_with_aioquic_as_the_server() -> None:
    path = Path(dwcp_is_client=True, mtu=65536)
    path.exchange()
    assert isinstance(path.dwcp, DwcpQuicConnection) and path.dwcp.pmtu is not None
    assert path.dwcp.pmtu.size > 16384
    assert path.largest[id(path.dwcp)] > 16384  # data left in jumbo datagrams, and arrived
    assert path.largest[id(path.server)] <= 1452  # the plain peer keeps its own size


def test_datagrams_grow_on_a_loopback_sized_path_with_aioquic_as_the_client() -> None:
    path = Path(dwcp_is_client=False, mtu=65536)
    path.exchange()
    assert isinstance(path.dwcp, DwcpQuicConnection) and path.dwcp.pmtu is not None
    assert path.largest[id(path.dwcp)] > 16384


def test_a_9000_byte_path_settles_on_jumbo_frames() -> None:
    path = Path(dwcp_is_client=True, mtu=9000)
    path.exchange()
    assert isinstance(path.dwcp, DwcpQuicConnection) and path.dwcp.pmtu is not None
    assert path.dwcp.pmtu.size == 9000 - pmtud.IP_UDP_OVERHEAD
    assert path.dwcp.pmtu.probes_lost >= pmtud.PROBE_TRIES  # the 64 KiB candidate failed


def test_a_1500_byte_path_stays_at_1452_and_lost_probes_are_not_congestion() -> None:
    path = Path(dwcp_is_client=True, mtu=1500, congestion="reno")
    path.exchange()
    dwcp = path.dwcp
    assert isinstance(dwcp, DwcpQuicConnection) and dwcp.pmtu is not None
    assert dwcp.pmtu.size == 1452
    assert path.largest[id(dwcp)] <= 1452
    assert dwcp.pmtu.probes_lost >= 2 * pmtud.PROBE_TRIES  # both candidates were tried
    assert dwcp.counters.packets_lost == 0  # Reno was never told of a loss: no window cut


def test_a_path_that_stops_carrying_big_datagrams_falls_back_to_the_base_size() -> None:
    """RFC 8899's black hole: the route changed under a connection at 64 KiB datagrams."""
    path = Path(dwcp_is_client=True, mtu=65536)
    path.exchange()
    dwcp = path.dwcp
    assert isinstance(dwcp, DwcpQuicConnection) and dwcp.pmtu is not None
    assert dwcp.pmtu.size > 16384
    path.mtu = 1500
    path.exchange()  # the data still arrives, in 1452-byte datagrams
    assert dwcp.pmtu.size == 1452
    assert dwcp._max_datagram_size == 1452


def test_a_probe_waits_for_a_window_that_holds_it() -> None:
    """A 64 KiB probe sent into a young window (10 packets) blocked the data behind it
    until a PTO declared it lost: +0.8 s on a 1 MB transfer over a 50 ms path."""
    probing = Path(dwcp_is_client=True, mtu=1500, delay=0.025).exchange()
    plain = Path(dwcp_is_client=True, mtu=1500, delay=0.025, pmtud_on=False).exchange()
    assert probing <= plain + 0.025  # within half an RTT (one 0.5 ms step is the resolution)


def test_search_drops_a_candidate_after_its_tries_and_keeps_an_acked_size() -> None:
    search = pmtud.PmtuSearch(1452, 65488)
    assert search.probe_due(0.0) == 65488
    for _ in range(pmtud.PROBE_TRIES):
        search.sent(65488)
        assert search.probe_due(0.0) is None  # one probe at a time
        search.lost(65488)
    assert search.probe_due(0.0) == 8952
    search.sent(8952)
    search.acked(8952, now=1.0)
    assert search.size == 8952
    assert search.probe_due(2.0) is None


@pytest.mark.skipif(not aio.LINUX, reason="IP_MTU_DISCOVER is Linux's")
def test_only_datagrams_past_the_base_size_leave_unfragmentable() -> None:
    """Probes and jumbo data must be lost on a narrower link, never fragmented; datagrams
    of the base size keep the kernel's default (a sub-1500 tunnel may fragment them)."""

    async def main() -> list[int]:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        sock = aio.open_udp_socket(socket.AF_INET, ("127.0.0.1", 0), 1 << 20)
        ep = aio.UdpEndpoint(sock, lambda batch: None)
        modes = []
        try:
            for size in (1200, 9000, 1452, 65000):
                ep.sendto(bytes(size), rx.getsockname())
                modes.append(sock.getsockopt(socket.IPPROTO_IP, aio.IP_MTU_DISCOVER))
        finally:
            ep.close()
            rx.close()
        return modes

    probe, want = aio.PMTUDISC_PROBE, aio.PMTUDISC_WANT
    assert asyncio.run(main()) == [want, probe, want, probe]


def test_a_search_whose_every_probe_was_lost_tries_again_later() -> None:
    # A starved host can drop every probe (a full socket buffer): that must not pin the
    # connection at the base size for the rest of its life.
    search = pmtud.PmtuSearch(1452, 65488)
    for size in (65488, 8952):
        for _ in range(pmtud.PROBE_TRIES):
            assert search.probe_due(5.0) == size
            search.sent(size)
            search.lost(size, now=5.0)
    assert search.size == 1452
    assert search.probe_due(5.0 + pmtud.BLACK_HOLE_WAIT - 1) is None
    assert search.probe_due(5.0 + pmtud.BLACK_HOLE_WAIT) == 65488
