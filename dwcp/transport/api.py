"""``serve`` and ``connect``: authenticated sessions between two nodes, and ``run``.

A connection becomes part of a session only after the TLS handshake accepted
the peer's key and the peer's ``Hello`` was echoed, so ``connect`` raises
``AuthenticationError`` when the server refuses the client's key (in TLS 1.3
the client finishes its handshake before the server has checked it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from aioquic.quic.packet import QuicPacketType

from dwcp import wire
from dwcp.errors import (
    AuthenticationError,
    ConnectionLostError,
    DwcpError,
    FrameError,
    IdleTimeoutError,
    TransportError,
    UsageError,
)
from dwcp.identity import NodeKey, PublicKey
from dwcp.transport.aio import (
    Addr,
    Conn,
    UdpEndpoint,
    now,
    open_udp_socket,
    random_session_id,
)
from dwcp.transport.config import TransportConfig
from dwcp.transport.core import CONTROL_STREAM
from dwcp.transport.quic import DwcpQuicConnection, parse_header
from dwcp.transport.session import RequestHandler, Session
from dwcp.transport.tls import make_configuration

log = logging.getLogger("dwcp.transport")
SessionHandler = Callable[[Session], Awaitable[None]]
_T = TypeVar("_T")
BACKLOG_LIMIT = 4 << 20
MAX_CONNECTIONS = 64  # per session, whatever the client asks for


class _Greeter:
    """Listener of a connection until its Hello is seen (server) or echoed (client)."""

    def __init__(
        self,
        on_hello: Callable[[Conn, wire.Hello, wire.FrameDecoder], None],
        on_fail: Callable[[DwcpError], None] = lambda exc: None,
    ) -> None:
        self.decoder = wire.FrameDecoder()
        self._on_hello = on_hello
        self._on_fail = on_fail
        # Data on other streams that overtook the Hello (reordering, or the
        # server's first request racing its echo); replayed to the session.
        self.backlog: list[tuple[int, bytes, bool]] = []
        self._backlog_bytes = 0

    def stream_data(self, conn: Conn, stream_id: int, data: bytes, fin: bool) -> None:
        try:
            if stream_id != CONTROL_STREAM:
                self._backlog_bytes += len(data)
                if self._backlog_bytes > BACKLOG_LIMIT:
                    raise FrameError("too much data on other streams before the Hello exchange")
                self.backlog.append((stream_id, data, fin))
                return
            frames = self.decoder.feed(data, limit=1)
            if not frames:
                return
            if not isinstance(frames[0], wire.Hello):
                raise FrameError(f"expected Hello, got {type(frames[0]).__name__}")
            self._on_hello(conn, frames[0], self.decoder)
        except DwcpError as exc:
            log.warning("closing connection: %s", exc)
            conn.close(f"protocol error: {exc}"[:100])

    def stream_reset(self, conn: Conn, stream_id: int) -> None:
        conn.close("stream reset before Hello")

    def hand_over(self, session: Session, conn: Conn, decoder: wire.FrameDecoder) -> None:
        """Make ``session`` the connection's listener, with what arrived so far."""
        session.adopt_control(conn, decoder)
        for stream_id, data, fin in self.backlog:
            session.stream_data(conn, stream_id, data, fin)
        self.backlog.clear()

    def terminated(self, conn: Conn, error: DwcpError) -> None:
        self._on_fail(error)

    def progress(self, conn: Conn) -> None:
        pass


def _quic_config(key: NodeKey, config: TransportConfig, *, is_client: bool) -> Any:
    return make_configuration(
        key,
        is_client=is_client,
        alpn=config.alpn,
        idle_timeout=config.idle_timeout,
        max_stream_data=config.stream_window,
        congestion=config.congestion,
    )


# --- client -----------------------------------------------------------------


async def _open_conn(
    host: str,
    port: int,
    key: NodeKey,
    trusted: frozenset[PublicKey],
    config: TransportConfig,
    hello: wire.Hello,
) -> tuple[Conn, wire.FrameDecoder, _Greeter, int]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConnectionLostError(f"cannot resolve {host}: {exc}") from exc
    family, _, _, _, addr = infos[0]
    bind: Addr = ("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0, 0, 0)
    sock = open_udp_socket(family, bind, config.socket_buffer)
    echoed: asyncio.Future[tuple[wire.FrameDecoder, wire.Hello]] = loop.create_future()

    def on_echo(conn: Conn, frame: wire.Hello, decoder: wire.FrameDecoder) -> None:
        if (frame.session_id, frame.index) != (hello.session_id, hello.index):
            raise FrameError("the server echoed a different Hello")
        if not echoed.done():
            echoed.set_result((decoder, frame))

    def on_fail(exc: DwcpError) -> None:
        if not echoed.done():
            echoed.set_exception(exc)
            echoed.exception()  # retrieved here or by the await below

    greeter = _Greeter(on_echo, on_fail)
    quic = DwcpQuicConnection(
        configuration=_quic_config(key, config, is_client=True), trusted=trusted
    )
    conn_box: list[Conn] = []

    def on_batch(batch: list[tuple[bytes, Addr]]) -> None:
        conn = conn_box[0]
        t = now()
        for data, src in batch:
            conn.receive(data, src, t)
        conn.process()

    endpoint = UdpEndpoint(sock, on_batch)
    conn = Conn(quic, endpoint, greeter, keepalive=config.idle_timeout / 3, owns_endpoint=True)
    conn_box.append(conn)
    quic.connect(addr, now=now())
    conn.transmit()
    try:
        async with asyncio.timeout(config.connect_timeout):
            await asyncio.shield(conn.connected)
            quic.send_stream_data(CONTROL_STREAM, wire.encode(hello))
            conn.transmit()
            decoder, echo = await echoed
    except (TimeoutError, IdleTimeoutError):
        # Before the Hello echo, the QUIC idle timer firing also means "nobody answered".
        conn.close("connect timeout")
        raise ConnectionLostError(
            f"no dwcp answer from {host}:{port}; "
            "check the address, that the server runs, and the firewall"
        ) from None
    except DwcpError:
        conn.close("handshake failed")
        raise
    return conn, decoder, greeter, echo.window


async def connect(
    host: str,
    port: int,
    key: NodeKey,
    trusted: Iterable[PublicKey],
    *,
    config: TransportConfig | None = None,
    on_request: RequestHandler | None = None,
) -> Session:
    """Open a session to the node at ``host:port`` whose key must be in ``trusted``."""
    config = config or TransportConfig()
    trust = frozenset(trusted)
    if not trust:
        raise UsageError("connect needs at least one trusted public key (--trust)")
    session_id = random_session_id()
    count = max(1, config.max_connections)
    first = wire.Hello(session_id, 0, count, config.bulk_window)
    conn, decoder, greeter, peer_window = await _open_conn(host, port, key, trust, config, first)
    assert conn.quic.peer_key is not None

    async def opener(session: Session, index: int) -> Conn:
        extra, dec, extra_greeter, _ = await _open_conn(
            host,
            port,
            key,
            frozenset({session.peer}),
            config,
            wire.Hello(session_id, index, count, config.bulk_window),
        )
        if extra.quic.peer_key != session.peer:
            extra.close("different peer")
            raise AuthenticationError("an extra connection reached a different node")
        extra.index = index
        extra_greeter.backlog.clear()  # a server sends nothing but the echo on extra connections
        del dec
        return extra

    session = Session(
        session_id=session_id,
        primary=conn,
        peer=conn.quic.peer_key,
        is_client=True,
        config=config,
        on_request=on_request,
        opener=opener,
        peer_window=peer_window,
    )
    greeter.hand_over(session, conn, decoder)
    if conn.error is not None:
        session.terminated(conn, conn.error)
    return session


# --- server -----------------------------------------------------------------


class Server:
    """A listening node: accepts sessions from trusted keys and runs ``handler`` for each."""

    def __init__(
        self,
        key: NodeKey,
        trusted: Iterable[PublicKey],
        handler: SessionHandler | None,
        config: TransportConfig,
        on_request: RequestHandler | None,
    ) -> None:
        self.key = key
        self.trusted = frozenset(trusted)
        if not self.trusted:
            raise UsageError("serve needs at least one trusted public key (--trust)")
        self.config = config
        self._handler = handler
        self._on_request = on_request
        self._quic_config = _quic_config(key, config, is_client=False)
        self._by_cid: dict[bytes, Conn] = {}
        self.sessions: dict[bytes, Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._endpoint: UdpEndpoint | None = None
        self._closed: asyncio.Future[None] | None = None
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        sock = open_udp_socket(family, addr, self.config.socket_buffer)
        self._endpoint = UdpEndpoint(sock, self._on_batch)
        name = sock.getsockname()
        self.address = (name[0], name[1])
        self._closed = loop.create_future()

    def _on_batch(self, batch: list[tuple[bytes, Addr]]) -> None:
        t = now()
        touched: dict[int, Conn] = {}
        cid_len = self._quic_config.connection_id_length
        by_cid = self._by_cid
        for data, addr in batch:
            # Fast path: short-header (1-RTT) packets carry our CID at bytes 1..1+cid_len,
            # so the bulk of the traffic skips a full header parse here.
            conn = by_cid.get(data[1 : 1 + cid_len]) if data and not data[0] & 0x80 else None
            if conn is not None:
                conn.receive(data, addr, t)
                touched[id(conn)] = conn
                continue
            header = parse_header(data, cid_len)
            if header is None:
                continue
            conn = by_cid.get(header.destination_cid)
            if conn is None:
                if header.packet_type != QuicPacketType.INITIAL or len(data) < 1200:
                    continue
                conn = self._new_conn(header.destination_cid)
            conn.receive(data, addr, t)
            touched[id(conn)] = conn
        for conn in touched.values():
            conn.process()

    def _new_conn(self, original_cid: bytes) -> Conn:
        assert self._endpoint is not None
        quic = DwcpQuicConnection(
            configuration=self._quic_config,
            trusted=self.trusted,
            original_destination_connection_id=original_cid,
        )
        conn = Conn(
            quic,
            self._endpoint,
            _Greeter(self._on_hello),
            keepalive=self.config.idle_timeout / 3,
            owns_endpoint=False,
        )
        by_cid = self._by_cid
        by_cid[original_cid] = conn
        by_cid[quic.host_cid] = conn

        def issued(cid: bytes) -> None:
            by_cid[cid] = conn

        def retired(cid: bytes) -> None:
            by_cid.pop(cid, None)

        conn.on_cid_issued = issued
        conn.on_cid_retired = retired

        def gone(c: Conn) -> None:
            for cid in [k for k, v in by_cid.items() if v is c]:
                del by_cid[cid]

        conn.on_gone = gone

        def hello_deadline() -> None:
            if isinstance(conn.listener, _Greeter):
                conn.close("no Hello in time")

        # The server's keepalive would otherwise hold a silent connection open forever.
        conn.loop.call_later(self.config.connect_timeout, hello_deadline)
        return conn

    def _on_hello(self, conn: Conn, hello: wire.Hello, decoder: wire.FrameDecoder) -> None:
        greeter = conn.listener
        assert isinstance(greeter, _Greeter)
        echo = dataclasses.replace(hello, window=self.config.bulk_window)
        peer = conn.quic.peer_key
        if peer is None:
            raise AuthenticationError("no peer key after the handshake")
        if hello.index == 0:
            if hello.session_id in self.sessions:
                raise FrameError("session id reused")
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
                self._spawn(self._run_handler(session))
        else:
            session = self.sessions.get(hello.session_id)  # type: ignore[assignment]
            if session is None or session.peer != peer:
                raise FrameError("Hello for an unknown session (or from another node)")
            if len(session.conns) >= min(hello.count, MAX_CONNECTIONS):
                raise FrameError("too many connections for one session")
            session.attach(conn)
            conn.quic.send_stream_data(CONTROL_STREAM, wire.encode(echo))
            greeter.hand_over(session, conn, decoder)
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

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Close every session and stop listening."""
        for session in list(self.sessions.values()):
            for conn in session.conns:
                conn.close("server shutting down")
        for conn in list(self._by_cid.values()):
            conn.close("server shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._endpoint is not None:
            endpoint = self._endpoint
            asyncio.get_running_loop().call_soon(endpoint.close)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)
        await asyncio.sleep(0)

    async def serve_forever(self) -> None:
        await self.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(
    host: str,
    port: int,
    key: NodeKey,
    trusted: Iterable[PublicKey],
    handler: SessionHandler | None = None,
    *,
    config: TransportConfig | None = None,
    on_request: RequestHandler | None = None,
) -> Server:
    """Listen on ``host:port`` (UDP; port 0 picks one, see ``Server.address``)."""
    server = Server(key, trusted, handler, config or TransportConfig(), on_request)
    await server.start(host, port)
    return server


def run(main: Coroutine[Any, Any, _T], *, use_uvloop: bool | None = None) -> _T:
    """Run ``main`` on uvloop when it is installed (unless ``use_uvloop`` is False)."""
    if use_uvloop is not False:
        try:
            import uvloop
        except ImportError:
            if use_uvloop:
                raise UsageError("uvloop is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)
