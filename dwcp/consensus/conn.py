"""Connections of the replica network binding: frames, the signed handshake, re-dialling.

Why a module of its own: the replica server and the client pool share it, and its caps
are what bound a replica's memory against anyone who can reach its port. A connection
first runs the handshake (``dwcp.consensus.handshake``) with frames capped at the
handshake's size and a deadline; only then are frames up to the message limit accepted
and handed on. Frames use the one framing of dwcp (``dwcp.framing``, u32 big-endian).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from dwcp import framing
from dwcp.consensus.handshake import DialerHandshake
from dwcp.errors import AuthenticationError, ProtocolError

log = logging.getLogger("dwcp.consensus")

MAX_WRITE_BUFFER = 64 << 20
"""Bytes queued to one peer before further frames to it are dropped."""
HANDSHAKE_TIMEOUT = 5.0
"""Seconds a connection may take to prove its key before it is closed."""

Handshaker = Callable[["FrameProtocol", bytes], bool]
"""Gets each handshake frame; returns True once the peer is authenticated; raises to reject."""


class FrameProtocol(asyncio.Protocol):
    """Splits a byte stream into frames; while ``handshake`` is set, frames go to it.

    Before authentication a frame may hold at most ``hs_limit`` bytes and the handshake
    must finish within ``HANDSHAKE_TIMEOUT``: an unauthenticated peer costs at most a
    small buffer for a few seconds.
    """

    def __init__(
        self,
        limit: int,
        on_frame: Callable[[FrameProtocol, bytes], None],
        on_lost: Callable[[FrameProtocol], None] | None = None,
        handshake: Handshaker | None = None,
        hs_limit: int = 4096,
        on_made: Callable[[FrameProtocol], None] | None = None,
    ) -> None:
        self.limit = limit
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.on_made = on_made
        self.handshake = handshake
        self.decoder = framing.Decoder(hs_limit if handshake is not None else limit)
        self.transport: asyncio.Transport | None = None
        self.dropped = 0
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def authenticated(self) -> bool:
        return self.handshake is None

    @property
    def buffered(self) -> int:
        return self.decoder.buffered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if self.handshake is not None:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(HANDSHAKE_TIMEOUT, self._expired)
        if self.on_made is not None:
            self.on_made(self)

    def _expired(self) -> None:
        self._expiry = None
        if self.handshake is not None:
            self.close()

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self.decoder.feed(data):
                if self.transport is None:
                    return
                hs = self.handshake
                if hs is None:
                    self.on_frame(self, payload)
                elif hs(self, payload):
                    self.handshake = None
                    self.decoder.max_frame = self.limit
                    if self._expiry is not None:
                        self._expiry.cancel()
                        self._expiry = None
        except (ProtocolError, AuthenticationError) as exc:
            log.debug("consensus connection closed: %s", exc)
            self.close()

    def send(self, frames: Sequence[bytes]) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.dropped += len(frames)
            return
        t.write(b"".join(framing.encode(f) for f in frames))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.on_lost is not None:
            self.on_lost(self)


class Endpoint(Protocol):
    """What a ``Link`` needs of its owner: the cluster, the frame limit, the frame handler."""

    addresses: tuple[tuple[str, int], ...]
    limit: int

    def on_frame(self, proto: FrameProtocol, data: bytes) -> None: ...


class Link:
    """An outgoing connection to one replica, authenticated, re-dialled when lost."""

    def __init__(
        self,
        node: Endpoint,
        target: int,
        make_handshake: Callable[[], DialerHandshake],
    ) -> None:
        self.node = node
        self.target = target
        self.make_handshake = make_handshake
        self.proto: FrameProtocol | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._dial())

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.node.addresses[self.target]
        delay = 0.02
        while True:
            lost: asyncio.Future[None] = loop.create_future()
            ready: asyncio.Future[FrameProtocol] = loop.create_future()
            try:
                await loop.create_connection(
                    functools.partial(self._protocol, lost, ready),
                    host,
                    port,
                )
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            waits: list[asyncio.Future[object]] = [lost, ready]  # type: ignore[list-item]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if ready.done():
                delay = 0.02
                self.proto = ready.result()
                await lost
                self.proto = None
            else:  # refused or timed out during the handshake: back off like a failed dial
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _protocol(
        self, lost: asyncio.Future[None], ready: asyncio.Future[FrameProtocol]
    ) -> FrameProtocol:
        hs = self.make_handshake()

        def on_made(proto: FrameProtocol) -> None:
            proto.send([hs.hello()])

        def on_handshake(proto: FrameProtocol, data: bytes) -> bool:
            proto.send([hs.receive(data)])
            if not ready.done():
                ready.set_result(proto)
            return True

        def on_lost(_: FrameProtocol) -> None:
            if not lost.done():
                lost.set_result(None)

        return FrameProtocol(
            self.node.limit,
            self.node.on_frame,
            on_lost,
            handshake=on_handshake,
            hs_limit=512,
            on_made=on_made,
        )

    def send(self, frames: Sequence[bytes]) -> None:
        if self.proto is not None:
            self.proto.send(frames)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.proto is not None:
            self.proto.close()
