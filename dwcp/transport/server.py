"""The listening side: demultiplex datagrams, admit handshakes, turn Hellos into sessions.

A new connection costs a handshake before the peer's key is known, so every
Initial first goes through ``admission.Admission`` (Retry above a number of
pending handshakes, caps on pending connections overall and per address, a
handshake rate per address); a connection becomes part of a session only
after TLS accepted the peer's key and its Hello arrived, and then counts
against that key's limits. Nothing else is kept for a peer before that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

from aioquic.quic.packet import QuicPacketType

from dwcp import wire
from dwcp.errors import AuthenticationError, FrameError, TransportError, UsageError
from dwcp.identity import NodeKey, PublicKey
from dwcp.tasks import TaskSet
from dwcp.transport.admission import Admission, AdmissionLimits, AdmissionStats, Ticket, Verdict
from dwcp.transport.aio import Addr, Conn, UdpEndpoint, now, open_udp_socket
from dwcp.transport.config import TransportConfig
from dwcp.transport.core import CONTROL_STREAM
from dwcp.transport.handshake import Greeter, quic_configuration
from dwcp.transport.quic import DwcpQuicConnection, RetryTokens, parse_header
from dwcp.transport.session import RequestHandler, Session

log = logging.getLogger("dwcp.transport")
SessionHandler = Callable[[Session], Awaitable[None]]
MAX_CONNECTIONS = 64  # per session, whatever the client asks for
MIN_INITIAL = 1200  # RFC 9000 14.1: smaller client Initials are dropped


class Server:
    """A listening node: accepts sessions from trusted keys and runs ``handler`` for each.

    ``async with`` closes it and waits for the handlers on exit.
    """

    def __init__(
        self,
        key: NodeKey,
        trusted: Iterable[PublicKey],
        handler: SessionHandler | None,
        config: TransportConfig,
        on_request: RequestHandler | None,
        limits: AdmissionLimits | None = None,
    ) -> None:
        self.key = key
        self.trusted = frozenset(trusted)
        if not self.trusted:
            raise UsageError("serve needs at least one trusted public key (--trust)")
        self.config = config
        self._handler = handler
        self._on_request = on_request
        self._quic_config = quic_configuration(key, config, is_client=False)
        self._admission = Admission(limits)
        self._retry = RetryTokens()
        self._by_cid: dict[bytes, Conn] = {}
        self._tickets: dict[int, Ticket] = {}  # id(conn) -> its place in the admission counts
        self.sessions: dict[bytes, Session] = {}
        self._tasks = TaskSet("session handlers")
        self._endpoint: UdpEndpoint | None = None
        self._closed: asyncio.Future[None] | None = None
        self.address: tuple[str, int] = ("", 0)

    @property
    def admission(self) -> AdmissionStats:
        """Handshake counters: pending, joined, accepted, retries, dropped, refused keys."""
        return self._admission.stats

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        sock = open_udp_socket(family, addr, self.config.socket_buffer)
        self._endpoint = UdpEndpoint(sock, self._on_batch)
        name = sock.getsockname()
        self.address = (name[0], name[1])
        self._closed = loop.create_future()

    # --- datagrams in -----------------------------------------------------------

    def _on_batch(self, batch: list[tuple[bytes, Addr]]) -> None:
        t = now()
        touched: dict[int, Conn] = {}
        cid_len = self._quic_config.connection_id_length
        by_cid = self._by_cid
        for data, addr in batch:
            # Fast path: short-header (1-RTT) packets carry our CID at bytes 1..1+cid_len,
            # so the bulk of the traffic skips a full header parse here.
            conn = by_cid.get(data[1 : 1 + cid_len]) if data and not data[0] & 0x80 else None
            if conn is None:
                conn = self._route(data, addr, t)
                if conn is None:
                    continue
            conn.receive(data, addr, t)
            touched[id(conn)] = conn
        for conn in touched.values():
            conn.process()

    def _route(self, data: bytes, addr: Addr, t: float) -> Conn | None:
        """The connection a long-header datagram belongs to, or a new one if admitted."""
        header = parse_header(data, self._quic_config.connection_id_length)
        if header is None:
            return None
        conn = self._by_cid.get(header.destination_cid)
        if conn is not None:
            return conn
        if header.packet_type != QuicPacketType.INITIAL or len(data) < MIN_INITIAL:
            return None
        if header.version not in self._quic_config.supported_versions:
            return None
        original, retry_cid = header.destination_cid, None
        if header.token:
            validated = self._retry.validate(header, addr, t)
            if validated is None:
                return None  # a forged, stale or other address's token
            original, retry_cid = validated, header.destination_cid
        verdict = self._admission.admit(addr[0], retry_cid is not None, t)
        if verdict is Verdict.RETRY:
            assert self._endpoint is not None
            self._endpoint.sendto(self._retry.retry_packet(header, addr, t), addr)
            return None
        if verdict is Verdict.DROP:
            return None
        ticket = self._admission.open(addr[0], retry_cid is not None)
        return self._new_conn(header.destination_cid, original, retry_cid, ticket)

    def _new_conn(
        self, dest_cid: bytes, original_cid: bytes, retry_cid: bytes | None, ticket: Ticket
    ) -> Conn:
        assert self._endpoint is not None
        quic = DwcpQuicConnection(
            configuration=self._quic_config,
            trusted=self.trusted,
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_cid,
        )
        quic.path_mtu.enabled = self.config.path_mtu_discovery
        conn = Conn(
            quic,
            self._endpoint,
            Greeter(self._on_hello),
            keepalive=self.config.idle_timeout / 3,
            owns_endpoint=False,
        )
        self._tickets[id(conn)] = ticket
        by_cid = self._by_cid
        by_cid[dest_cid] = conn
        by_cid[quic.host_cid] = conn

        def issued(cid: bytes) -> None:
            by_cid[cid] = conn

        def retired(cid: bytes) -> None:
            by_cid.pop(cid, None)

        conn.on_cid_issued = issued
        conn.on_cid_retired = retired
        conn.on_gone = self._gone

        def hello_deadline() -> None:
            if isinstance(conn.listener, Greeter):
                conn.close("no Hello in time")

        # The server's keepalive would otherwise hold a silent connection open forever.
        conn.loop.call_later(self.config.connect_timeout, hello_deadline)
        return conn

    def _gone(self, conn: Conn) -> None:
        for cid in [k for k, v in self._by_cid.items() if v is conn]:
            del self._by_cid[cid]
        ticket = self._tickets.pop(id(conn), None)
        if ticket is not None:
            self._admission.release(ticket)

    # --- Hello: a connection joins a session ------------------------------------

    def _on_hello(self, conn: Conn, hello: wire.Hello, decoder: wire.FrameDecoder) -> None:
        greeter = conn.listener
        assert isinstance(greeter, Greeter)
        echo = dataclasses.replace(hello, window=self.config.bulk_window)
        peer = conn.quic.peer_key
        if peer is None:
            raise AuthenticationError("no peer key after the handshake")
        ticket = self._tickets[id(conn)]
        if hello.index == 0:
            if hello.session_id in self.sessions:
                raise FrameError("session id reused")
            if not self._admission.join(ticket, peer, new_session=True):
                raise FrameError(f"node {peer.node_id} has too many sessions or connections here")
            session = Session(
                session_id=hello.session_id,
                primary=conn,
                peer=peer,
                is_client=False,
                config=self.config,
                on_request=self._on_request,
                peer_window=hello.window,
            )
            self.sessions[hello.session_id] = session
            session.add_close_callback(self._forget)
            conn.quic.send_stream_data(CONTROL_STREAM, wire.encode(echo))
            greeter.hand_over(session, conn, decoder)
            if self._handler is not None:
                self._tasks.spawn(self._run_handler(session))
        else:
            known = self.sessions.get(hello.session_id)
            if known is None or known.peer != peer:
                raise FrameError("Hello for an unknown session (or from another node)")
            if len(known.conns) >= min(hello.count, MAX_CONNECTIONS):
                raise FrameError("too many connections for one session")
            if not self._admission.join(ticket, peer, new_session=False):
                raise FrameError(f"node {peer.node_id} has too many connections here")
            known.attach(conn)
            conn.quic.send_stream_data(CONTROL_STREAM, wire.encode(echo))
            greeter.hand_over(known, conn, decoder)
        conn.transmit_soon()

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)

    async def _run_handler(self, session: Session) -> None:
        assert self._handler is not None
        try:
            await self._handler(session)
        except TransportError as exc:
            log.info("session with %s ended: %s", session.peer.node_id, exc)
        except Exception:
            log.exception("session handler failed")
            await session.close("handler failed")

    # --- the end ------------------------------------------------------------------

    def close(self) -> None:
        """Close every session and connection and stop listening (``wait_closed`` waits)."""
        for session in list(self.sessions.values()):
            for conn in session.conns:
                conn.close("server shutting down")
        for conn in list(self._by_cid.values()):
            conn.close("server shutting down")
        for task in self._tasks:
            task.cancel()
        if self._endpoint is not None:
            endpoint = self._endpoint
            asyncio.get_running_loop().call_soon(endpoint.close)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until ``close`` was called and every session handler has finished."""
        if self._closed is not None:
            await asyncio.wait([self._closed])
        await self._tasks.aclose()
        await asyncio.sleep(0)  # let the socket close (scheduled by close)

    async def serve_forever(self) -> None:
        await self.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()
