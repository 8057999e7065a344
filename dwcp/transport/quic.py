"""aioquic's QuicConnection with what dwcp needs from it, and every aioquic internal dwcp touches.

What aioquic lacks and dwcp adds:

- Trust: the TLS context is hooked (``install_trust_check``) as soon as
  aioquic creates it, so the peer key is checked inside the handshake.
- Receive-side back-pressure: for "paced" streams (channels), MAX_STREAM_DATA
  credit is granted only as the application consumes (aioquic doubles the
  window whenever data arrives, so memory would follow the producer's speed).
- Link statistics: packets sent and lost, smoothed RTT, congestion window, for
  the adaptive controller; per-stream send-buffer state for back-pressure.
- Path MTU discovery (``pmtud``): PING+PADDING probes, datagrams up to 64 KiB.

aioquic has no public API for these, so this module (with ``quic_pacing``, its
packet-path half) is the only one in dwcp that touches aioquic's private
members; each is behind a named function or method, listed in ``PRIVATES``
and checked by ``check_aioquic`` (a test runs it, so a new aioquic that renames
one fails loudly rather than misbehaving). pyproject pins ``TESTED_SERIES``.

Still sans-IO: the asyncio glue in ``aio.py`` feeds it datagrams and ``now``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

import aioquic
from aioquic import tls
from aioquic._buffer import Buffer  # aioquic.buffer re-exports it without __all__
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import (
    QuicFrameType,
    QuicHeader,
    encode_quic_retry,
    pull_quic_header,
    pull_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.quic.stream import QuicStream, QuicStreamSender

from dwcp.identity import PublicKey
from dwcp.transport import bbr, pmtud
from dwcp.transport.quic_pacing import (
    STREAM_FRAME_MAX,
    BurstPacer,
    LinkCounters,
    PathMtu,
    count_packets,
    report_ack_delay,
    watch_black_hole,
    write_stream_frames,
)
from dwcp.transport.tls import AlertCertificateRequired, certificate_public_key

CONGESTION_CONTROLLERS = ("reno", "cubic", bbr.NAME)
TESTED_SERIES = "1.7."


class PacedStream:
    """Receive credit of one stream: the peer may send up to ``consumed + window``."""

    __slots__ = ("consumed", "window")

    def __init__(self, window: int) -> None:
        self.consumed = 0
        self.window = window


# --- aioquic internals, one named function each -----------------------------


def _sender(stream: QuicStream) -> QuicStreamSender:
    return stream.sender


def sender_unacked(sender: QuicStreamSender) -> int:
    """Bytes written and not yet acknowledged."""
    return len(sender._buffer)


def sender_unsent(sender: QuicStreamSender) -> int:
    """Bytes written and never sent (retransmissions excluded)."""
    return int(sender._buffer_stop - sender.highest_offset)


def sender_acked(sender: QuicStreamSender) -> int:
    """Contiguous bytes the peer has acknowledged."""
    return int(sender._buffer_start)


def sender_pending(sender: QuicStreamSender) -> bool:
    """True while written data or the end of stream awaits the peer's acknowledgement."""
    if sender.is_finished or sender._reset_error_code is not None:
        return False
    return sender._buffer_stop > sender._buffer_start or sender._buffer_fin is not None


def peer_certificate(ctx: tls.Context) -> Any:
    """The certificate the peer presented so far (None before its Certificate message)."""
    return ctx._peer_certificate


def request_client_certificate(ctx: tls.Context) -> None:
    """Make a server context ask the client for a certificate (aioquic's flag for tests)."""
    ctx._request_client_certificate = True


def after_certificate_verify(ctx: tls.Context, hook: Callable[[], None]) -> None:
    """Client: run ``hook`` once the server's CertificateVerify proved its key."""
    original: Callable[[Any], None] = ctx._client_handle_certificate_verify

    def handle(input_buf: Any) -> None:
        original(input_buf)
        hook()

    ctx._client_handle_certificate_verify = handle  # type: ignore[method-assign]


def before_server_finished(ctx: tls.Context, hook: Callable[[], None]) -> None:
    """Server: run ``hook`` on the client's Finished, before 1-RTT keys are committed."""
    original: Callable[[Any, Any], None] = ctx._server_handle_finished

    def handle(input_buf: Any, output_buf: Any) -> None:
        hook()
        original(input_buf, output_buf)

    ctx._server_handle_finished = handle  # type: ignore[method-assign]


def parse_header(data: bytes, host_cid_length: int) -> QuicHeader | None:
    """The long or short header of a datagram's first packet; None if it is not QUIC."""
    try:
        return pull_quic_header(Buffer(data=data), host_cid_length=host_cid_length)
    except ValueError:
        return None


class RetryTokens:
    """Stateless address validation (QUIC Retry, RFC 9000 8.1) with aioquic's token handler.

    The token seals the client's address and its original connection id under
    a key that never leaves this object; nothing is stored per client.
    """

    def __init__(self) -> None:
        self._handler = QuicRetryTokenHandler()

    def retry_packet(self, header: QuicHeader, addr: Any, now: float) -> bytes:
        """A Retry answering ``header``'s Initial from ``addr``."""
        source_cid = os.urandom(8)
        token = self._handler.create_token(
            address=addr,
            original_destination_connection_id=header.destination_cid,
            retry_source_connection_id=source_cid,
            now=now,
        )
        return encode_quic_retry(
            version=header.version or 1,
            source_cid=source_cid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=token,
        )

    def validate(self, header: QuicHeader, addr: Any, now: float) -> bytes | None:
        """The original destination connection id if the Initial's token is good, else None."""
        try:
            return self._handler.validate_token(
                address=addr, destination_cid=header.destination_cid, token=header.token, now=now
            )
        except ValueError:
            return None


def install_trust_check(
    ctx: tls.Context,
    *,
    is_client: bool,
    trusted: Iterable[PublicKey],
    on_peer: Callable[[PublicKey], None],
) -> None:
    """Hook ``ctx`` so the handshake fails unless the peer shows a trusted key.

    The server requests a client certificate and refuses an empty one; each
    side compares the certificate's key (whose possession CertificateVerify
    has just proven) with ``trusted`` and reports the accepted key to ``on_peer``.
    """
    allowed = frozenset(trusted)

    def check() -> None:
        peer = certificate_public_key(peer_certificate(ctx))
        if peer is None:
            raise AlertCertificateRequired("dwcp needs an Ed25519 certificate from the peer")
        if peer not in allowed:
            raise tls.AlertBadCertificate(f"node {peer.node_id} ({peer.text}) is not trusted")
        on_peer(peer)

    if is_client:
        after_certificate_verify(ctx, check)
    else:
        request_client_certificate(ctx)
        before_server_finished(ctx, check)


class DwcpQuicConnection(QuicConnection):
    """QuicConnection with in-handshake trust checks, paced streams and loss counters."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        trusted: Iterable[PublicKey],
        **kwargs: Any,
    ) -> None:
        super().__init__(configuration=configuration, **kwargs)
        recovery = self._loss
        pacer = recovery._pacer = BurstPacer(max_datagram_size=self._max_datagram_size)
        cc = recovery._cc
        self._bbr = cc if isinstance(cc, bbr.BbrCongestionControl) else None
        if self._bbr is not None:
            cc_bbr = self._bbr
            pacer.rate_source = lambda: cc_bbr.pacing_rate
            report_ack_delay(recovery, cc_bbr)
        self.trusted = frozenset(trusted)
        self.peer_key: PublicKey | None = None
        self.counters = LinkCounters()
        self.path_mtu = PathMtu(self)
        count_packets(cc, self.counters, self.path_mtu.probes)
        watch_black_hole(cc, self.path_mtu.black_hole)
        self.paced: dict[int, PacedStream] = {}
        self.app_has_more: Callable[[], bool] = lambda: False
        """Set by the session: True while a bulk writer still has data to hand over."""

    def careful_resume(self, rate: float, rtt: float) -> bool:
        """Start at ``rate`` bytes/s on a path known to have ``rtt`` s (``bbr.careful_resume``);
        False (nothing done) with a controller other than dwcp-bbr."""
        if self._bbr is None:
            return False
        self._bbr.careful_resume(rate, rtt)
        return True

    @property
    def committed_rate(self) -> float:
        """Bytes/s this connection carries or is about to resume (0 without dwcp-bbr)."""
        return self._bbr.committed_rate if self._bbr is not None else 0.0

    @property
    def resume_state(self) -> dict[str, str | float] | None:
        """The careful resume's phase and why (None: the connection started cold)."""
        r = self._bbr.resume if self._bbr is not None else None
        if r is None:
            return None
        return {"phase": r.phase, "reason": r.reason, "rate_bps": round(r.rate * 8)}

    @property
    def is_client(self) -> bool:
        return bool(self._is_client)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        out = super().datagrams_to_send(now)
        out += self.path_mtu.datagrams(now)
        # App-limited (see bbr's docstring) only if the application has nothing more:
        # lanes are kept short on purpose, so a bulk sender's buffers run empty between
        # chunks many times per round trip while its writer waits for room.
        if (
            self._bbr is not None
            and all(s.sender.buffer_is_empty for s in self._streams.values())
            and not self.app_has_more()
        ):
            self._bbr.mark_app_limited()
        return out

    @property
    def pmtu(self) -> pmtud.PmtuSearch | None:
        """Path MTU search, from the handshake's confirmation (None before)."""
        return self.path_mtu.search

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        peer = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
        if peer is not None:
            self.path_mtu.peer_max = peer

    def _set_peer(self, key: PublicKey) -> None:
        self.peer_key = key

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        install_trust_check(
            self.tls,
            is_client=self._is_client,
            trusted=self.trusted,
            on_peer=self._set_peer,
        )

    # --- link statistics ---------------------------------------------------

    @property
    def smoothed_rtt(self) -> float:
        """Smoothed RTT in seconds (0.0 before the first sample)."""
        return float(self._loss._rtt_smoothed)

    @property
    def min_rtt(self) -> float:
        rtt = float(self._loss._rtt_min)
        return 0.0 if rtt == float("inf") else rtt

    @property
    def congestion_window(self) -> int:
        return int(self._loss.congestion_window)

    @property
    def bytes_in_flight(self) -> int:
        return int(self._loss.bytes_in_flight)

    # --- per-stream send state ---------------------------------------------

    def send_buffered(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else sender_unacked(stream.sender)

    def send_unsent(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` and never sent yet (retransmissions excluded)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else sender_unsent(stream.sender)

    def send_acked(self, stream_id: int) -> int:
        """Contiguous bytes of ``stream_id`` the peer has acknowledged."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else sender_acked(stream.sender)

    def unflushed(self) -> bool:
        """True while some stream holds written data the peer has not acknowledged."""
        return any(sender_pending(s.sender) for s in self._streams.values())

    def reserve_stream(self, stream_id: int) -> None:
        """Create the local stream now, so ``get_next_available_stream_id`` moves past it.

        aioquic advances the next id only once a stream exists; lanes are
        allocated before their first byte is written.
        """
        self._get_or_create_stream_for_send(stream_id)

    # --- receive-side back-pressure ----------------------------------------

    def pace_stream(self, stream_id: int, window: int) -> PacedStream:
        """Grant ``stream_id`` credit only as ``consume`` reports bytes used."""
        paced = self.paced.get(stream_id)
        if paced is None:
            paced = self.paced[stream_id] = PacedStream(window)
        return paced

    def consume(self, stream_id: int, nbytes: int) -> bool:
        """Record that the application took ``nbytes``; True if new credit should be sent."""
        paced = self.paced.get(stream_id)
        if paced is None:
            return False
        paced.consumed += nbytes
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        return paced.consumed + paced.window - stream.max_stream_data_local_sent >= (
            paced.window // 2
        )

    def _write_stream_frame(
        self,
        builder: QuicPacketBuilder,
        space: QuicPacketSpace,
        stream: QuicStream,
        max_offset: int,
    ) -> int:
        if self._max_datagram_size <= STREAM_FRAME_MAX:
            return int(QuicConnection._write_stream_frame(self, builder, space, stream, max_offset))
        return write_stream_frames(self, builder, stream, max_offset)

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        sid = stream.stream_id
        paced = self.paced.get(sid) if self.paced and sid is not None else None
        if paced is None or sid is None:
            QuicConnection._write_stream_limits(self, builder, space, stream)
            return
        target = paced.consumed + paced.window
        if target - stream.max_stream_data_local_sent < paced.window // 2:
            return
        stream.max_stream_data_local = target
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
            handler=self._on_max_stream_data_delivery,
            handler_args=(stream,),
        )
        buf.push_uint_var(sid)
        buf.push_uint_var(target)
        stream.max_stream_data_local_sent = target


# --- compatibility check ----------------------------------------------------

# Every private aioquic member used above: (owner, name, parameters if a method).
PRIVATES: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("QuicConnection", "_initialize", ("self", "peer_cid")),
    ("QuicConnection", "_write_stream_limits", ("self", "builder", "space", "stream")),
    ("QuicConnection", "_get_or_create_stream_for_send", ("self", "stream_id")),
    ("QuicConnection", "_on_max_stream_data_delivery", ("self", "delivery", "stream")),
    ("QuicConnection", "_parse_transport_parameters", ("self", "data", "from_session_ticket")),
    ("QuicConnection", "_write_stream_frame", ("self", "builder", "space", "stream", "max_offset")),
    ("QuicConnection", "_flush_builder", ("self", "builder", "network_path", "peer_cid", "now")),
    ("connection", "_loss", None),
    ("connection", "_handshake_confirmed", None),
    ("connection", "_close_pending", None),
    ("connection", "_network_paths", None),
    ("connection", "_peer_cid", None),
    ("connection", "_packet_number", None),
    ("connection", "_cryptos", None),
    ("connection", "_quic_logger", None),
    ("connection", "_version", None),
    ("connection", "_streams", None),
    ("connection", "_is_client", None),
    ("connection", "_max_datagram_size", None),
    ("recovery", "_cc", None),
    ("recovery", "on_ack_received", ("ack_rangeset", "ack_delay", "now", "space")),
    ("recovery", "max_ack_delay", None),
    ("recovery", "_pacer", None),
    ("recovery", "_rtt_smoothed", None),
    ("recovery", "_rtt_min", None),
    ("pacer", "_max_datagram_size", None),
    ("sender", "_buffer", None),
    ("sender", "_buffer_start", None),
    ("sender", "_buffer_stop", None),
    ("sender", "_buffer_fin", None),
    ("sender", "_reset_error_code", None),
    ("Context", "_client_handle_certificate_verify", ("self", "input_buf")),
    ("Context", "_server_handle_finished", ("self", "input_buf", "output_buf")),
    ("context", "_peer_certificate", None),
    ("context", "_request_client_certificate", None),
)


def check_aioquic(configuration: QuicConfiguration) -> list[str]:
    """What changed in the installed aioquic that this module relies on (empty: all good).

    Builds a client connection from ``configuration`` (no I/O) to look at
    instance attributes as well as method signatures.
    """
    problems: list[str] = []
    if not aioquic.__version__.startswith(TESTED_SERIES):
        problems.append(f"aioquic {aioquic.__version__} is not the tested {TESTED_SERIES}x")
    conn = QuicConnection(configuration=configuration)
    conn.connect(("127.0.0.1", 9), now=0.0)  # creates the TLS context
    stream = conn._get_or_create_stream_for_send(conn.get_next_available_stream_id())
    owners: dict[str, Any] = {
        "QuicConnection": QuicConnection,
        "Context": tls.Context,
        "connection": conn,
        "recovery": conn._loss,
        "pacer": conn._loss._pacer,
        "sender": stream.sender,
        "context": conn.tls,
    }
    for owner, name, params in PRIVATES:
        obj = owners[owner]
        if not hasattr(obj, name):
            problems.append(f"{owner}.{name} is gone")
            continue
        if params is not None:
            found = tuple(inspect.signature(getattr(obj, name)).parameters)
            if found != params:
                problems.append(f"{owner}.{name} takes {found}, expected {params}")
    if not isinstance(conn._loss._pacer, QuicPacketPacer):
        problems.append("the recovery's pacer is no longer a QuicPacketPacer")
    return problems
