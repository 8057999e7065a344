"""Asyncio glue: UDP sockets, timers and one ``Conn`` per QUIC connection.

Owns sockets, timers and futures and makes no protocol decisions. Two things
differ from aioquic's own asyncio layer, both for speed and accuracy:
datagrams are read in batches (up to ``BATCH`` per wake-up) and the connection
transmits once per batch instead of once per datagram; and ``now`` comes from
``time.monotonic`` rather than the loop clock, which under uvloop has only
millisecond resolution and would distort RTT, pacing and loss timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from aioquic.quic import events
from aioquic.quic.packet import QuicErrorCode

from dwcp.errors import (
    AuthenticationError,
    ConnectionLostError,
    DwcpError,
    IdleTimeoutError,
    SessionClosedError,
)
from dwcp.transport.quic import DwcpQuicConnection

log = logging.getLogger("dwcp.transport")
BATCH = 256
Addr = Any  # a socket address tuple, as recvfrom returns it

now = time.monotonic


class ConnListener(Protocol):
    """Who gets a connection's stream data and fate (a Session, or the server before Hello)."""

    def stream_data(self, conn: Conn, stream_id: int, data: bytes, fin: bool) -> None: ...
    def stream_reset(self, conn: Conn, stream_id: int) -> None: ...
    def terminated(self, conn: Conn, error: DwcpError) -> None: ...
    def progress(self, conn: Conn) -> None: ...


def set_socket_buffers(sock: socket.socket, size: int) -> int:
    """Size SO_RCVBUF/SO_SNDBUF (the FORCE variants beat rmem_max as root); return what stuck."""
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


class UdpEndpoint:
    """A non-blocking UDP socket read in batches; ``on_batch`` gets a list of datagrams."""

    def __init__(
        self,
        sock: socket.socket,
        on_batch: Callable[[list[tuple[bytes, Addr]]], None],
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._on_batch = on_batch
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False
        self._no_fragmentation = False

    def _readable(self) -> None:
        recv = self.sock.recvfrom
        batch: list[tuple[bytes, Addr]] = []
        for _ in range(BATCH):
            try:
                batch.append(recv(65536))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ECONNREFUSED queued by ICMP: not fatal for QUIC
                log.debug("recvfrom: %s", exc)
                break
        if batch:
            self._on_batch(batch)

    def sendto(self, data: bytes, addr: Addr) -> None:
        big = len(data) > FRAGMENT_MAX
        if big != self._no_fragmentation and LINUX:
            no_fragmentation(self.sock, big)  # a syscall only when the size class changes
            self._no_fragmentation = big
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return  # a full socket buffer is a lost datagram; QUIC recovers
        except OSError as exc:
            # EMSGSIZE: a path MTU probe larger than the interface (lost, as it should be).
            if exc.errno not in (
                errno.ECONNREFUSED,
                errno.ENETUNREACH,
                errno.EHOSTUNREACH,
                errno.EMSGSIZE,
            ):
                raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


def _terminated_error(event: events.ConnectionTerminated) -> DwcpError:
    code = event.error_code
    reason = event.reason_phrase
    if reason == "Idle timeout":
        return IdleTimeoutError(
            "the peer stopped answering for longer than the idle timeout; "
            "reconnect and resume when it is back"
        )
    if QuicErrorCode.CRYPTO_ERROR <= code < QuicErrorCode.CRYPTO_ERROR + 0x100:
        return AuthenticationError(
            f"TLS handshake refused ({reason or 'alert ' + str(code - 0x100)}): check that "
            "both nodes trust each other's public key and speak the same dwcp version"
        )
    if code == QuicErrorCode.NO_ERROR:
        return ConnectionLostError(f"the peer closed the connection ({reason or 'no reason'})")
    return ConnectionLostError(f"connection lost: QUIC error {code:#x} {reason}")


class Conn:
    """One QUIC connection: feeds it datagrams and timers, sends what it produces."""

    def __init__(
        self,
        quic: DwcpQuicConnection,
        endpoint: UdpEndpoint,
        listener: ConnListener,
        *,
        keepalive: float,
        owns_endpoint: bool,
    ) -> None:
        self.quic = quic
        self.endpoint = endpoint
        self.listener = listener
        self.owns_endpoint = owns_endpoint
        self.loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.error: DwcpError | None = None
        self.index = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._soon: asyncio.Handle | None = None
        self._keepalive_every = keepalive
        self._keepalive: asyncio.TimerHandle | None = None
        self.on_cid_issued: Callable[[bytes], None] = lambda cid: None
        self.on_cid_retired: Callable[[bytes], None] = lambda cid: None
        self.on_gone: Callable[[Conn], None] = lambda conn: None

    @property
    def closed(self) -> bool:
        return self.error is not None

    # --- input ----------------------------------------------------------------

    def receive(self, data: bytes, addr: Addr, t: float) -> None:
        """Feed one datagram; call ``process`` after the batch."""
        self.quic.receive_datagram(data, addr, now=t)

    def process(self) -> None:
        """Dispatch the events of the batch, then transmit once."""
        self._events()
        self.transmit()
        if self.error is None:
            self.listener.progress(self)

    def _events(self) -> None:
        quic = self.quic
        listener = self.listener
        event = quic.next_event()
        while event is not None:
            if isinstance(event, events.StreamDataReceived):
                listener.stream_data(self, event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                listener.stream_reset(self, event.stream_id)
            elif isinstance(event, events.HandshakeCompleted):
                if not self.connected.done():
                    self.connected.set_result(None)
                self._arm_keepalive()
            elif isinstance(event, events.ConnectionIdIssued):
                self.on_cid_issued(event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self.on_cid_retired(event.connection_id)
            elif isinstance(event, events.ConnectionTerminated):
                self._fail(_terminated_error(event))
            event = quic.next_event()

    def _fail(self, error: DwcpError) -> None:
        if self.error is not None:
            return
        self.error = error
        if not self.connected.done():
            self.connected.set_exception(error)
            self.connected.exception()  # mark retrieved: the caller may be gone
        for handle in (self._timer, self._keepalive, self._soon):
            if handle is not None:
                handle.cancel()
        # Let the last datagrams (CONNECTION_CLOSE) go out before the socket closes.
        self.loop.call_soon(self._release)
        self.listener.terminated(self, error)

    def _release(self) -> None:
        self.on_gone(self)
        if self.owns_endpoint:
            self.endpoint.close()

    # --- output ---------------------------------------------------------------

    def transmit(self) -> None:
        self._soon = None
        if self.endpoint.closed:
            return
        sendto = self.endpoint.sendto
        for data, addr in self.quic.datagrams_to_send(now=now()):
            sendto(data, addr)
        timer_at = self.quic.get_timer()
        if timer_at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if timer_at is not None:
                self._timer = self.loop.call_later(max(0.0, timer_at - now()), self._on_timer)
            self._timer_at = timer_at

    def transmit_soon(self) -> None:
        if self._soon is None and self.error is None:
            self._soon = self.loop.call_soon(self.transmit)

    def _on_timer(self) -> None:
        self._timer = None
        at = self._timer_at
        self._timer_at = None
        self.quic.handle_timer(now=max(now(), at or 0.0))
        self.process()

    def _arm_keepalive(self) -> None:
        if self.error is None:
            self._keepalive = self.loop.call_later(self._keepalive_every, self._ping)

    def _ping(self) -> None:
        self.quic.send_ping(0)
        self.transmit()
        self._arm_keepalive()

    def close(self, reason: str = "") -> None:
        """Close politely (CONNECTION_CLOSE with ``reason``); the peer sees ConnectionLostError."""
        if self.error is None:
            self.quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)
            self.transmit()
            self._events()
            if self.error is None:
                self._fail(SessionClosedError(f"closed locally ({reason or 'no reason'})"))


# Linux's IP_MTU_DISCOVER modes: WANT (the default: DF, but fragment what exceeds a
# known path MTU) and PROBE (DF, never fragment, ignore the kernel's path MTU cache).
IP_MTU_DISCOVER, IPV6_MTU_DISCOVER, PMTUDISC_WANT, PMTUDISC_PROBE = 10, 23, 1, 3
FRAGMENT_MAX = 1452  # dwcp's base datagram size (tls.make_configuration)
LINUX = os.uname().sysname == "Linux"


def no_fragmentation(sock: socket.socket, on: bool) -> None:
    """``on``: datagrams leave whole or not at all, so a too-large path MTU probe (and
    data in datagrams past the base size) is lost, never fragmented. Off (the default)
    for datagrams up to the base size, which a sub-1500 tunnel may still fragment."""
    mode = PMTUDISC_PROBE if on else PMTUDISC_WANT
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, mode)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, mode)


def open_udp_socket(family: int, bind: Addr, buffer: int) -> socket.socket:
    """A bound UDP socket with BDP-sized kernel buffers."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        set_socket_buffers(sock, buffer)
        sock.bind(bind)
    except OSError:
        sock.close()
        raise
    return sock


def random_session_id() -> bytes:
    return os.urandom(16)
