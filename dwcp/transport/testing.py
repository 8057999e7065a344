"""Hostile peers for tests and benchmarks: a ClientHello flood from one UDP socket.

Not used by dwcp itself. ``HelloFlood`` starts aioquic client connections as
fast as it is called, either fire-and-forget (one Initial each, as from
spoofed addresses) or answering whatever the server sends (it passes a Retry
and goes on handshaking, with no certificate a dwcp node trusts).
"""

from __future__ import annotations

import socket
import ssl
import time

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from dwcp.transport.quic import parse_header
from dwcp.transport.tls import ALPN


class HelloFlood:
    """aioquic client connections on one raw UDP socket aimed at ``target``."""

    def __init__(self, target: tuple[str, int], *, answer: bool, alpn: str = ALPN) -> None:
        self.target = target
        self.answer = answer
        self.sent = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1" if target[0] == "127.0.0.1" else "0.0.0.0", 0))
        self.sock.setblocking(False)
        self._conns: dict[bytes, QuicConnection] = {}  # by our connection id, when answering
        self._config = QuicConfiguration(
            is_client=True, alpn_protocols=[alpn], verify_mode=ssl.CERT_NONE
        )

    def _send(self, conn: QuicConnection) -> None:
        for data, _addr in conn.datagrams_to_send(now=time.monotonic()):
            try:
                self.sock.sendto(data, self.target)
            except BlockingIOError:
                return  # a full socket buffer: the datagram is lost, as on a network

    def hello(self) -> None:
        """Start one more handshake (one ClientHello)."""
        conn = QuicConnection(configuration=self._config)
        conn.connect(self.target, now=time.monotonic())
        self._send(conn)
        self.sent += 1
        if self.answer:
            self._conns[conn.host_cid] = conn

    def pump(self, limit: int = 10_000) -> None:
        """Read what the server sent; when answering, feed it to the connections and reply."""
        for _ in range(limit):
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            if not self.answer:
                continue
            header = parse_header(data, 8)
            conn = self._conns.get(header.destination_cid) if header is not None else None
            if conn is not None:
                conn.receive_datagram(data, addr, now=time.monotonic())
                self._send(conn)

    def close(self) -> None:
        self.sock.close()
        self._conns.clear()
