"""asyncio-shaped entry points: ``dwcp.open_connection`` / ``dwcp.start_server``.

They take the arguments ``asyncio.open_connection`` / ``asyncio.start_server`` take,
plus the node key and the trusted peer keys, and give the same reader / writer pair,
so code written against asyncio streams runs over an authenticated QUIC session
unchanged. Each connection is one session carrying one ordered channel; the writer
owns the session, so ``writer.close()`` ends it, as closing an asyncio writer ends
its TCP connection. ``writer.get_extra_info("peer_key")`` is the peer's PublicKey.

For large transfers use the session API instead (``dwcp.transport.connect``,
``Session.send`` / ``open_bulk``): it stripes one transfer across many QUIC
connections and streams, which one channel does not.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from dwcp.identity import NodeKey, PublicKey
from dwcp.transport.api import Server, connect, serve
from dwcp.transport.channel import ChannelReader, ChannelWriter
from dwcp.transport.config import TransportConfig
from dwcp.transport.session import Session

log = logging.getLogger("dwcp.streams")

CHANNEL = "dwcp.stream"  # the channel name both ends use
ACCEPT_SECONDS = 30.0  # a client that connects but opens no channel is dropped after this

StreamReader = ChannelReader
ClientConnected = Callable[[ChannelReader, "StreamWriter"], Awaitable[None] | None]


class StreamWriter:
    """``asyncio.StreamWriter``'s shape over a channel; closing it closes its session."""

    def __init__(self, writer: ChannelWriter, session: Session) -> None:
        self._w = writer
        self._session = session
        self._closing: asyncio.Task[None] | None = None

    @property
    def session(self) -> Session:
        """The session under this stream (requests, other channels, bulk transfers)."""
        return self._session

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._w.write(data)

    def writelines(self, data: Iterable[bytes]) -> None:
        self._w.write(b"".join(data))

    async def drain(self) -> None:
        await self._w.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._w.write_eof()

    def close(self) -> None:
        """End the stream and then the session (what was written is flushed first)."""
        self._w.close()
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(
                self._session.close("stream closed")
            )

    def is_closing(self) -> bool:
        return self._closing is not None or self._session.closed

    async def wait_closed(self) -> None:
        if self._closing is not None:
            await asyncio.shield(self._closing)
        else:
            await self._w.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peer_key`` (PublicKey), ``channel``, ``stream_id``; ``session`` (the Session)."""
        if name == "session":
            return self._session
        return self._w.get_extra_info(name, default)


async def open_connection(
    host: str,
    port: int,
    *,
    key: NodeKey,
    trusted: Iterable[PublicKey],
    config: TransportConfig | None = None,
) -> tuple[ChannelReader, StreamWriter]:
    """Connect to a ``start_server`` at ``host:port``; returns ``(reader, writer)``.

    Raises AuthenticationError if the server's key is not in ``trusted`` (or it does
    not trust ours), TransportError subclasses if it cannot be reached in
    ``config.connect_timeout``.
    """
    session = await connect(host, port, key, trusted, config=config)
    try:
        chan = await session.open_channel(CHANNEL)
    except BaseException:
        await session.close("could not open the stream")
        raise
    return chan.reader, StreamWriter(chan.writer, session)


class StreamServer:
    """What ``start_server`` returns: ``asyncio.Server``'s shape over a dwcp ``Server``."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); with port 0 the port picked."""
        return self.server.address

    def close(self) -> None:
        self.server.close()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()

    async def serve_forever(self) -> None:
        await self.server.serve_forever()

    async def __aenter__(self) -> StreamServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(
    client_connected_cb: ClientConnected,
    host: str,
    port: int,
    *,
    key: NodeKey,
    trusted: Iterable[PublicKey],
    config: TransportConfig | None = None,
) -> StreamServer:
    """Listen on ``host:port`` (UDP; 0 picks a port, see ``StreamServer.address``) and
    call ``client_connected_cb(reader, writer)`` for each trusted client, as asyncio does
    (a coroutine function's result is awaited)."""

    async def on_session(session: Session) -> None:
        try:
            async with asyncio.timeout(ACCEPT_SECONDS):
                chan = await session.accept_channel()
        except TimeoutError:
            await session.close("no stream opened")
            return
        result = client_connected_cb(chan.reader, StreamWriter(chan.writer, session))
        if inspect.isawaitable(result):
            await result

    return StreamServer(await serve(host, port, key, trusted, on_session, config=config))
