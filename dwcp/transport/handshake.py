"""The Hello exchange that makes an authenticated QUIC connection part of a session.

Each connection starts with a client-opened control stream whose first frame
is ``Hello`` (which session, which connection index, the sender's bulk
window); the server echoes it with its own window. Until then the
connection's listener is a ``Greeter``, which holds data that overtook the
Hello (bounded) and hands everything to the session once it is known.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aioquic.quic.configuration import QuicConfiguration

from dwcp import wire
from dwcp.errors import DwcpError, FrameError
from dwcp.identity import NodeKey
from dwcp.transport.aio import Conn
from dwcp.transport.config import TransportConfig
from dwcp.transport.core import CONTROL_STREAM
from dwcp.transport.session import Session
from dwcp.transport.tls import make_configuration

log = logging.getLogger("dwcp.transport")
BACKLOG_LIMIT = 4 << 20


def quic_configuration(
    key: NodeKey, config: TransportConfig, *, is_client: bool
) -> QuicConfiguration:
    """The QUIC configuration of one side of a dwcp connection."""
    return make_configuration(
        key,
        is_client=is_client,
        alpn=config.alpn,
        idle_timeout=config.idle_timeout,
        max_stream_data=config.stream_window,
        congestion=config.congestion,
    )


class Greeter:
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
