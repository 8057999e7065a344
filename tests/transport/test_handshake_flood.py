"""A flood of ClientHellos leaves the server's state bounded and a running transfer completes.

Issue 19 item 7: 3,000 ClientHellos in 7 s raised a node's RSS from 72 to 346 MB
(every Initial got a connection, kept until its Hello deadline) and slowed a
concurrent 4 MiB transfer 20x. The flood here comes from a raw UDP socket and
aioquic's own client connection objects, either fire-and-forget (one Initial
each, as from spoofed addresses) or answering everything the server sends
(passing the Retry, then handshaking with no trusted key). The assertions
count live server connections, not time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import socket
import ssl
import time
import weakref
from typing import Any

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from dwcp.transport import Session, TransportConfig, connect, serve
from dwcp.transport.quic import DwcpQuicConnection
from dwcp.transport.tls import ALPN

from .helpers import run, two_keys

MiB = 1 << 20
# The server's cap on pending handshakes (admission.AdmissionLimits.max_pending) plus the
# real session's connections; without a cap every Initial holds a connection for seconds.
BOUND = 128 + 8


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class Flooder:
    """aioquic client connections on one raw UDP socket, started as fast as possible."""

    def __init__(self, target: tuple[str, int], *, answer: bool) -> None:
        self.target = target
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.conns: dict[bytes, QuicConnection] = {}  # by host cid, when answering
        self.config = QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE
        )

    def _send(self, conn: QuicConnection) -> None:
        for data, _addr in conn.datagrams_to_send(now=time.monotonic()):
            try:
                self.sock.sendto(data, self.target)
            except BlockingIOError:
                return

    def hello(self) -> None:
        conn = QuicConnection(configuration=self.config)
        conn.connect(self.target, now=time.monotonic())
        self._send(conn)
        if self.answer:
            self.conns[conn.host_cid] = conn

    def pump(self) -> None:
        """Answer what the server sent (Retry, handshake) as a real client would."""
        for _ in range(10_000):
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return
            if not self.answer:
                continue
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            except ValueError:
                continue
            conn = self.conns.get(header.destination_cid)
            if conn is not None:
                conn.receive_datagram(data, addr, now=time.monotonic())
                self._send(conn)

    def close(self) -> None:
        self.sock.close()
        self.conns.clear()


@pytest.mark.parametrize(
    ("answer", "hellos"), [(False, 3000), (True, 1000)], ids=["blind", "answering"]
)
def test_a_clienthello_flood_keeps_server_state_bounded(
    monkeypatch: pytest.MonkeyPatch, answer: bool, hellos: int
) -> None:
    server_side: weakref.WeakSet[Any] = weakref.WeakSet()
    original_init = DwcpQuicConnection.__init__

    def counting_init(self: DwcpQuicConnection, **kwargs: Any) -> None:
        original_init(self, **kwargs)
        if not kwargs["configuration"].is_client:
            server_side.add(self)

    monkeypatch.setattr(DwcpQuicConnection, "__init__", counting_init)
    payload = os.urandom(4 * MiB)
    a, b = two_keys()
    config = TransportConfig(idle_timeout=30.0)
    state: dict[str, int] = {"most": 0, "growth": 0}

    async def main() -> None:
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handler(session: Session) -> None:
            receiver = await session.accept_bulk()
            received.set_result(b"".join([chunk async for chunk in receiver]))

        server = await serve("127.0.0.1", 0, a, [b.public], handler, config=config)
        session = await connect(*server.address, b, [a.public], config=config)
        transfer = asyncio.ensure_future(session.send([payload]))
        flooder = Flooder(server.address, answer=answer)
        gc.collect()
        rss_before = _rss()
        try:
            for i in range(hellos):
                flooder.hello()
                if i % 50 == 49:
                    await asyncio.sleep(0)  # let the server read its socket
                    flooder.pump()
                if i % 250 == 249:
                    gc.collect()  # count what is really held, not garbage yet to be freed
                    state["most"] = max(state["most"], len(server_side))
            for _ in range(20):  # let the last answers play out
                await asyncio.sleep(0.01)
                flooder.pump()
            gc.collect()
            state["most"] = max(state["most"], len(server_side))
            if not answer:
                state["growth"] = _rss() - rss_before
            assert await asyncio.wait_for(transfer, 120) == len(payload)
            assert await asyncio.wait_for(received, 120) == payload
        finally:
            flooder.close()
            await session.close()
            server.close()
            await server.wait_closed()

    run(main(), timeout=300)
    assert state["most"] <= BOUND, f"{state['most']} server connections alive during the flood"
    assert state["growth"] < 100 * MiB, f"RSS grew by {state['growth'] / MiB:.0f} MiB"
