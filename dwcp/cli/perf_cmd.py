"""``dwcp perf``: an iperf3-like goodput test over an authenticated dwcp session.

Server: ``dwcp perf --listen HOST:PORT --key K --trust PUB...`` (until SIGINT/SIGTERM).
Client: ``dwcp perf HOST:PORT --key K --trust PUB... [--seconds N | --bytes N] [--json]``.
Goodput counts bytes the server's application consumed (end-to-end acknowledged).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from typing import Any

from dwcp import rates
from dwcp.errors import TransportError, UsageError
from dwcp.identity import NodeKey, PublicKey
from dwcp.rates import rate_arg

BLOCK = 1 << 20


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = units.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise UsageError(f"not a size: {text!r} (examples: 1000000, 512M, 1G)") from None


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "perf", help="goodput test over a dwcp session (server with --listen, else client)"
    )
    p.add_argument("target", nargs="?", metavar="HOST:PORT", help="server to test against")
    p.add_argument("--listen", metavar="HOST:PORT", help="run the server side")
    p.add_argument("--key", required=True, help="this node's private key file")
    p.add_argument(
        "--trust", nargs="+", required=True, metavar="PUB", help="trusted peer keys or .pub files"
    )
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--seconds", type=float, help="send for N seconds (default 10)")
    amount.add_argument("--bytes", type=_size, help="send N bytes (suffixes K, M, G)")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    p.add_argument("--policy", default="probe", help="parallelism policy (probe, fixed)")
    p.add_argument("--connections", type=int, default=1, help="initial QUIC connections")
    p.add_argument("--streams", type=int, default=2, help="initial streams per connection")
    p.add_argument("--max-connections", type=int, default=8)
    p.add_argument("--max-streams", type=int, default=8)
    p.add_argument(
        "--rate",
        type=rate_arg,
        default=rates.parse_rate("1gbit"),
        help=f"link rate hint for BDP sizing ({rates.EXAMPLES}; default 1gbit)",
    )
    p.add_argument("--rtt", type=float, default=0.05, help="RTT hint in seconds (BDP sizing)")
    p.add_argument(
        "--congestion",
        default="dwcp-bbr",
        help="QUIC congestion controller (reno, cubic, dwcp-bbr)",
    )
    p.add_argument("--interval", type=float, default=0.5, help="adaptation interval, seconds")
    p.add_argument(
        "--resume-bps",
        type=float,
        default=0.0,
        help="careful resume: start at this known path rate, bit/s (0 = cold start)",
    )
    p.add_argument(
        "--resume-rtt", type=float, default=0.0, help="careful resume: the path's stored RTT, s"
    )
    p.add_argument("--idle-timeout", type=float, default=30.0)
    p.add_argument(
        "--no-pmtud", action="store_true", help="keep datagrams at 1452 bytes (no path MTU probes)"
    )
    p.add_argument(
        "--loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="event loop"
    )
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> Any:
    from dwcp.transport import TransportConfig

    return TransportConfig(
        idle_timeout=args.idle_timeout,
        bandwidth_bps=args.rate * 8,
        rtt=args.rtt,
        policy=args.policy,
        initial_connections=args.connections,
        initial_streams=args.streams,
        max_connections=args.max_connections,
        max_streams=args.max_streams,
        interval=args.interval,
        congestion=args.congestion,
        resume_bps=args.resume_bps,
        resume_rtt=args.resume_rtt,
        path_mtu_discovery=not args.no_pmtud,
    )


def run(args: argparse.Namespace) -> int:
    from dwcp.transport import run as run_loop

    if (args.listen is None) == (args.target is None):
        raise UsageError("give either --listen HOST:PORT (server) or HOST:PORT (client)")
    key = NodeKey.load(args.key)
    trusted = [PublicKey.parse(t) for t in args.trust]
    use_uvloop = {"auto": None, "uvloop": True, "asyncio": False}[args.loop]
    if args.listen is not None:
        return run_loop(_server(args, key, trusted), use_uvloop=use_uvloop)
    return run_loop(_client(args, key, trusted), use_uvloop=use_uvloop)


async def _server(args: argparse.Namespace, key: NodeKey, trusted: list[PublicKey]) -> int:
    from dwcp.transport import Session, serve

    host, port = _hostport(args.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def on_request(session: Session, body: bytes) -> bytes:
        return body  # echo: the client measures request RTT with it

    async def handler(session: Session) -> None:
        print(f"session from node {session.peer.node_id}", file=sys.stderr, flush=True)
        while True:
            recv = await session.accept_bulk()
            total = 0
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                async for chunk in recv:
                    total += len(chunk)
            except TransportError as exc:
                # A timed client closes the session at its deadline.
                print(f"session ended ({exc})", file=sys.stderr, flush=True)
            dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            print(
                f"received {total} bytes in {dt:.2f} s ({total * 8 / max(dt, 1e-9) / 1e6:.1f} "
                f"Mbit/s), cpu {cpu:.2f} s = {cpu / max(total, 1) * 1e9:.2f} s/GB",
                file=sys.stderr,
                flush=True,
            )

    server = await serve(
        host, port, key, trusted, handler, config=_config(args), on_request=on_request
    )
    print(f"dwcp perf listening on {server.address[0]}:{server.address[1]}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    return 0


async def _client(args: argparse.Namespace, key: NodeKey, trusted: list[PublicKey]) -> int:
    from dwcp.transport import connect

    host, port = _hostport(args.target)
    seconds = args.seconds if args.bytes is None and args.seconds is not None else None
    if args.bytes is None and seconds is None:
        seconds = 10.0
    session = await connect(host, port, key, trusted, config=_config(args))
    block = memoryview(os.urandom(BLOCK))
    t_ping = time.perf_counter()
    await session.request(b"ping")
    handshake_rtt = (time.perf_counter() - t_ping) * 1000
    t0, cpu0 = time.perf_counter(), time.process_time()
    sender = session.open_bulk()

    async def pump() -> None:
        while True:
            await sender.write(block)

    try:
        if args.bytes is not None:
            left = args.bytes
            while left > 0:
                n = min(BLOCK, left)
                await sender.write(block[:n])
                left -= n
            total = await sender.finish()
        else:
            # Like iperf3 -t: count what the receiver consumed by the deadline.
            task = asyncio.ensure_future(pump())
            await asyncio.wait([task], timeout=seconds)
            total = sender.acked
            if task.done():
                task.result()  # the session failed: raise its error
            task.cancel()
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        stats = session.stats()
        resumed = [c.quic.resume_state for c in session.conns]
    finally:
        await session.close("perf done")
    goodput = total * 8 / max(elapsed, 1e-9)
    timeline = [
        {
            "t": p.t,
            "connections": p.connections,
            "streams": p.streams,
            "goodput_bps": p.goodput_bps,
            "rtt_ms": p.rtt_ms,
            "loss": p.loss,
        }
        for p in stats.timeline
    ]
    if not args.json or sys.stdout.isatty():
        print(f"{'t (s)':>7} {'conns':>5} {'streams':>7} {'Mbit/s':>9} {'rtt ms':>7} {'loss':>7}")
        for p in stats.timeline:
            print(
                f"{p.t:7.2f} {p.connections:5d} {p.streams:7d} {p.goodput_bps / 1e6:9.1f} "
                f"{p.rtt_ms:7.2f} {p.loss:7.2%}"
            )
        print(
            f"goodput {goodput / 1e6:.1f} Mbit/s ({total} bytes in {elapsed:.2f} s), "
            f"rtt {stats.rtt_ms:.2f} ms, loss {stats.loss:.3%}, "
            f"{stats.connections} connection(s) x {stats.streams} stream(s)"
        )
    if args.json:
        snap = session.snapshot()
        print(
            json.dumps(
                {
                    "goodput_bps": goodput,
                    "bytes": total,
                    "seconds": elapsed,
                    "cpu_seconds": cpu,
                    "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                    "rtt_ms": stats.rtt_ms,
                    "request_rtt_ms": handshake_rtt,
                    "loss": stats.loss,
                    "packets_sent": stats.packets_sent,
                    "packets_lost": stats.packets_lost,
                    "connections": stats.connections,
                    "streams": stats.streams,
                    "policy": snap.policy,
                    "decision": asdict(snap.decision) if snap.decision else None,
                    "timeline": timeline,
                    "resume": resumed,
                }
            )
        )
    return 0
