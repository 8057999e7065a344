"""AMST: the adaptive multi-stream transport over QUIC, authenticated by node keys.

Public API (stable; other components build on it)::

    from dwcp.transport import serve, connect, run, Session, TransportConfig

    server = await serve(host, port, key, trusted, handler, *, config=None, on_request=None)
        # handler: async (Session) -> None, run for each new session;
        # on_request: async (Session, bytes) -> bytes answers session.request();
        # server.address -> (host, port); server.close(); await server.wait_closed()
    session = await connect(host, port, key, trusted, *, config=None, on_request=None)

    reply = await session.request(b"...", timeout=None)   # RemoteError if the handler failed
    chan = await session.open_channel("name")             # peer: await session.accept_channel()
    chan.writer.write(b"..."); await chan.writer.drain(); chan.writer.write_eof()
    data = await chan.reader.read(n) / readexactly(n)
    end = await session.send(buffers, offset=0)          # returns after the peer consumed all
    sender = session.open_bulk(offset=0); await sender.write(buf); await sender.finish()
    receiver = await session.accept_bulk()                # peer side
    async for chunk in receiver: ...                      # in order; receiver.offset = consumed
    session.peer (PublicKey), session.stats(), session.snapshot() (adaptive controller)
    await session.close(reason, linger=5.0)  # flushes what was written first
    await session.wait_closed()
    run(main())                                           # uvloop.run when installed

``key`` is a ``dwcp.identity.NodeKey``; ``trusted`` an iterable of ``PublicKey``.
``TransportConfig`` (frozen): ``idle_timeout``, ``connect_timeout``, the link
hints ``bandwidth_bps`` / ``rtt`` (flow-control windows, the bulk window and
UDP buffers are sized from their product), ``chunk``, ``window``, ``policy``
("probe" or "fixed", or any name given to ``dwcp.pba.parallelism.register_policy``),
``initial_connections`` / ``initial_streams``, ``max_connections`` /
``max_streams``, ``interval`` (adaptation period), ``congestion`` ("dwcp-bbr"
by default; "cubic", "reno"), ``alpn``.
Errors: ``AuthenticationError`` (peer key not trusted / refused ours / wrong
ALPN), ``IdleTimeoutError`` (peer silent past ``config.idle_timeout``),
``ConnectionLostError`` (peer closed, network or protocol failure),
``SessionClosedError`` (closed locally). To resume a bulk transfer after a
failure: reconnect and ``send`` the rest with ``offset=`` the receiver's
``BulkReceiver.offset`` (the bytes its application consumed).

Layers: ``dwcp.wire`` (sans-IO frames), ``stripe`` (sans-IO striping and
reassembly), ``dwcp.pba.parallelism`` (sans-IO parallelism controller, policies by name),
``bbr`` (rate-based congestion controller for aioquic), ``tls`` (certificates
from Ed25519 keys, trust check), ``quic`` (aioquic connection with paced
streams and link counters), ``aio`` (sockets, batched reads, timers),
``channel`` and ``bulk`` (application end-points), ``session`` (streams,
lanes, adaptation loop), ``api`` (serve, connect, Hello exchange).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dwcp.transport.api import Server, connect, run, serve
    from dwcp.transport.bulk import BulkReceiver, BulkSender
    from dwcp.transport.channel import Channel
    from dwcp.transport.config import TransportConfig
    from dwcp.transport.session import Session

__all__ = [
    "BulkReceiver",
    "BulkSender",
    "Channel",
    "Server",
    "Session",
    "TransportConfig",
    "connect",
    "run",
    "serve",
]

_WHERE = {
    "Server": "api",
    "connect": "api",
    "run": "api",
    "serve": "api",
    "TransportConfig": "config",
    "BulkReceiver": "bulk",
    "BulkSender": "bulk",
    "Channel": "channel",
    "Session": "session",
}


def __getattr__(name: str) -> Any:
    """Import lazily so ``import dwcp.transport`` stays cheap (aioquic loads on first use)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dwcp.transport' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"dwcp.transport.{module}"), name)
