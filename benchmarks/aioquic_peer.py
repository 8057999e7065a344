"""Baseline for transport_bench: one plain aioquic connection, one stream, bulk send.

    python aioquic_peer.py server HOST PORT --seconds N  # prints "ready", serves one transfer
    python aioquic_peer.py client HOST PORT            # sends until the server replies; JSON line
    python aioquic_peer.py server HOST PORT --bytes N  # counts one N-byte stream to its end
    python aioquic_peer.py client HOST PORT --bytes N  # sends N bytes, ends the stream; JSON line

With ``--bytes`` both sides report their own CPU (``time.process_time``) over the
transfer only (first byte to last), so the loopback efficiency cell of
transport_bench compares protocol stacks, not interpreter start-up; ``--uvloop``
runs either side on uvloop, as dwcp does by default.

What a user would get from aioquic with sensible settings: a self-signed
certificate made at run time, 1452-byte datagrams, flow-control windows of
16 MiB (above the bandwidth-delay product of every benchmarked link), 4 MiB
socket buffers and the default congestion controller (``--cc`` to change it).
The receiver counts what arrives in the N seconds after its first byte, like
iperf3's fixed-duration test, so a slow tail after a lossy run costs no time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALPN = ["dwcp-bench-baseline"]
WINDOW = 16 * 1024 * 1024
SOCKBUF = 4 * 1024 * 1024
UNACKED_LIMIT = 8 * 1024 * 1024  # keep this much unacknowledged data queued, no more
CHUNK = b"\x5a" * 65536
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def _config(is_client: bool, cc: str) -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=ALPN,
        max_data=WINDOW,
        max_stream_data=WINDOW,
        max_datagram_size=1452,
        congestion_control_algorithm=cc,
        idle_timeout=30.0,
    )
    if is_client:
        cfg.verify_mode = ssl.CERT_NONE
    return cfg


def _self_signed(cfg: QuicConfiguration) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with tempfile.TemporaryDirectory() as d:
        cpath, kpath = Path(d, "c.pem"), Path(d, "k.pem")
        cpath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kpath.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        cfg.load_cert_chain(cpath, kpath)


def _big_buffers(protocol: QuicConnectionProtocol) -> None:
    sock: Any = protocol._transport.get_extra_info("socket")  # type: ignore[attr-defined]
    for opt, force in ((socket.SO_SNDBUF, SO_SNDBUFFORCE), (socket.SO_RCVBUF, SO_RCVBUFFORCE)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)


class Receiver(QuicConnectionProtocol):
    """Counts stream bytes for ``seconds`` from the first one (or, with ``total``, until the
    stream ends), then replies with the count."""

    done: asyncio.Event
    seconds: float
    total: int | None = None
    result: ClassVar[dict[str, Any]] = {}

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.received = 0
        self.first = 0.0
        self.cpu0 = 0.0
        self.stream_id = -1

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        _big_buffers(self)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and not Receiver.done.is_set():
            if self.stream_id < 0:
                self.first = time.monotonic()
                self.cpu0 = time.process_time()
                self.stream_id = event.stream_id
                if Receiver.total is None:
                    asyncio.get_running_loop().call_later(Receiver.seconds, self.report)
            self.received += len(event.data)
            if Receiver.total is not None and event.end_stream:
                self.report()

    def report(self) -> None:
        secs = time.monotonic() - self.first
        cpu = time.process_time() - self.cpu0
        Receiver.result = {"bytes": self.received, "seconds": secs, "cpu_seconds": cpu}
        reply = json.dumps(Receiver.result).encode()
        self._quic.send_stream_data(self.stream_id, reply, end_stream=True)
        self.transmit()
        Receiver.done.set()


async def run_server(host: str, port: int, seconds: float, cc: str, total: int | None) -> None:
    cfg = _config(False, cc)
    _self_signed(cfg)
    Receiver.done = asyncio.Event()
    Receiver.seconds = seconds
    Receiver.total = total
    server = await serve(host, port, configuration=cfg, create_protocol=Receiver)
    print("ready", flush=True)
    await Receiver.done.wait()
    await asyncio.sleep(2.0)  # let the reply be delivered
    server.close()
    if total is not None:
        print(json.dumps(Receiver.result), flush=True)


async def send_bytes(host: str, port: int, total: int, cc: str) -> dict[str, Any]:
    """Send ``total`` bytes on one stream, end it, wait for the receiver's count."""
    async with connect(host, port, configuration=_config(True, cc)) as proto:
        _big_buffers(proto)
        quic = proto._quic
        sid = quic.get_next_available_stream_id()
        reader, writer = await proto.create_stream(sid)
        t0, cpu0 = time.monotonic(), time.process_time()
        first = min(total, len(CHUNK))
        left = total - first
        quic.send_stream_data(sid, CHUNK[:first], end_stream=left == 0)
        sender = quic._streams[sid].sender  # private: aioquic exposes no send-buffer level
        while left > 0:
            while left > 0 and sender._buffer_stop - sender._buffer_start < UNACKED_LIMIT:
                n = min(left, len(CHUNK))
                left -= n
                quic.send_stream_data(sid, CHUNK[:n], end_stream=left == 0)
            proto.transmit()
            await asyncio.sleep(0.002)
        reply = json.loads(await asyncio.wait_for(reader.read(), timeout=120))
        reply["sender_seconds"] = time.monotonic() - t0
        reply["sender_cpu_seconds"] = time.process_time() - cpu0
        reply["goodput_bps"] = reply["bytes"] * 8 / reply["sender_seconds"]
        del writer
        return dict(reply)


async def run_client(host: str, port: int, seconds: float, cc: str) -> dict[str, Any]:
    async with connect(host, port, configuration=_config(True, cc)) as proto:
        _big_buffers(proto)
        quic = proto._quic
        sid = quic.get_next_available_stream_id()
        reader, writer = await proto.create_stream(sid)
        quic.send_stream_data(sid, CHUNK)
        sender = quic._streams[sid].sender  # private: aioquic exposes no send-buffer level
        reply_task = asyncio.ensure_future(reader.read())
        deadline = time.monotonic() + seconds + 30
        while not reply_task.done() and time.monotonic() < deadline:
            while sender._buffer_stop - sender._buffer_start < UNACKED_LIMIT:
                quic.send_stream_data(sid, CHUNK)
            proto.transmit()
            await asyncio.sleep(0.002)
        reply = json.loads(await asyncio.wait_for(reply_task, timeout=5))
        reply["goodput_bps"] = reply["bytes"] * 8 / reply["seconds"]
        del writer  # closing the connection ends the stream
        return dict(reply)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("role", choices=("server", "client"))
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--bytes", type=int, help="one transfer of exactly N bytes")
    ap.add_argument("--cc", default="reno", help="aioquic congestion control (reno, cubic)")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop")
    a = ap.parse_args()
    run: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.run
    if a.uvloop:
        import uvloop

        run = uvloop.run
    if a.role == "server":
        run(run_server(a.host, a.port, a.seconds, a.cc, a.bytes))
    elif a.bytes is not None:
        print(json.dumps(run(send_bytes(a.host, a.port, a.bytes, a.cc))))
    else:
        print(json.dumps(run(run_client(a.host, a.port, a.seconds, a.cc))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
