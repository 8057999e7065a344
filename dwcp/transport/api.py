"""``serve`` and ``connect``: authenticated sessions between two nodes, and ``run``.

A connection becomes part of a session only after the TLS handshake accepted
the peer's key and the peer's ``Hello`` was echoed, so ``connect`` raises
``AuthenticationError`` when the server refuses the client's key (in TLS 1.3
the client finishes its handshake before the server has checked it). The
listening side is ``server.Server``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from dwcp import wire
from dwcp.errors import (
    AuthenticationError,
    ConnectionLostError,
    DwcpError,
    FrameError,
    IdleTimeoutError,
    UsageError,
)
from dwcp.identity import NodeKey, PublicKey
from dwcp.transport.admission import AdmissionLimits
from dwcp.transport.aio import Addr, Conn, UdpEndpoint, now, open_udp_socket, random_session_id
from dwcp.transport.config import TransportConfig
from dwcp.transport.core import CONTROL_STREAM
from dwcp.transport.handshake import Greeter, quic_configuration
from dwcp.transport.quic import DwcpQuicConnection
from dwcp.transport.resume import jump_rate
from dwcp.transport.server import Server, SessionHandler
from dwcp.transport.session import RequestHandler, Session

__all__ = ["Server", "connect", "run", "serve"]

_T = TypeVar("_T")


# --- client -----------------------------------------------------------------


async def _open_conn(
    host: str,
    port: int,
    key: NodeKey,
    trusted: frozenset[PublicKey],
    config: TransportConfig,
    hello: wire.Hello,
    resume_rate: float = 0.0,
) -> tuple[Conn, wire.FrameDecoder, Greeter, int]:
    """One connection of a session; ``resume_rate`` (bytes/s, > 0) = careful resume at it."""
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

    greeter = Greeter(on_echo, on_fail)
    quic = DwcpQuicConnection(
        configuration=quic_configuration(key, config, is_client=True), trusted=trusted
    )
    quic.path_mtu.enabled = config.path_mtu_discovery
    if resume_rate > 0 and config.resume_rtt > 0:
        quic.careful_resume(resume_rate, config.resume_rtt)
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
    # A known path (careful resume): the first connection resumes the whole stored rate,
    # the others only what is left of it when they open (``resume.jump_rate``).
    known = config.resume_bps / 8 if config.resume_bps > 0 and config.resume_rtt > 0 else 0.0
    conn, decoder, greeter, peer_window = await _open_conn(
        host, port, key, trust, config, first, known
    )
    assert conn.quic.peer_key is not None

    pending: dict[int, float] = {}  # the jump rates of connections still handshaking

    async def opener(session: Session, index: int) -> Conn:
        rate = 0.0
        if known and index < config.initial_connections:
            up = [c.quic.committed_rate for c in session.conns]
            rate = pending[index] = jump_rate(known, up + list(pending.values()))
        try:
            extra, dec, extra_greeter, _ = await _open_conn(
                host,
                port,
                key,
                frozenset({session.peer}),
                config,
                wire.Hello(session_id, index, count, config.bulk_window),
                rate,
            )
        finally:
            pending.pop(index, None)  # the session attaches it before its next await
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
    elif known:
        # The level a known path starts at: its connections handshake now, while the
        # application prepares its transfer, not after the first bulk byte.
        session.open_initial()
    return session


async def serve(
    host: str,
    port: int,
    key: NodeKey,
    trusted: Iterable[PublicKey],
    handler: SessionHandler | None = None,
    *,
    config: TransportConfig | None = None,
    on_request: RequestHandler | None = None,
    limits: AdmissionLimits | None = None,
) -> Server:
    """Listen on ``host:port`` (UDP; port 0 picks one, see ``Server.address``).

    ``limits`` bound the handshakes and connections peers can make it hold.
    """
    server = Server(key, trusted, handler, config or TransportConfig(), on_request, limits)
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
