"""AMST: the adaptive multi-stream transport over QUIC, authenticated by node keys.

Public API (stable; other components build on it)::

    from dwcp.transport import serve, connect, run, Session, TransportConfig

    server = await serve(host, port, key, trusted, handler, *, config=None, on_request=None,
                         limits=None)
        # handler: async (Session) -> None, run for each new session;
        # on_request: async (Session, bytes) -> bytes answers session.request();
        # limits: AdmissionLimits (handshakes and connections a peer can make it hold);
        # server.address -> (host, port); server.admission (AdmissionStats);
        # server.close(); await server.wait_closed()  (waits for the handlers too)
        # async with server: ...                       (closes and waits on exit)
    session = await connect(host, port, key, trusted, *, config=None, on_request=None)
    async with session: ...                               # closes and waits on exit

    reply = await session.request(b"...", timeout=None)   # RemoteError if the handler failed
    chan = await session.open_channel("name")             # peer: await session.accept_channel()
    chan.writer.write(b"..."); await chan.writer.drain(); chan.writer.write_eof()
    data = await chan.reader.read(n) / readexactly(n)
        # channels behave like asyncio's StreamReader / StreamWriter: read() (to the end),
        # readexactly (any size, also above the window), readuntil, readline, async for
        # line; writelines, can_write_eof, close, is_closing, wait_closed,
        # get_extra_info("peer_key" | "channel" | "stream_id")
        # Cancelling a pending read, accept or request leaves the session usable.
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

The sans-IO session core, for building on without asyncio (see ``core``):
``SessionCore(config, is_client=, peer_window=, limits=PeerLimits())`` over
QUIC connections (``add_connection``); ``receive(conn, stream, data, fin)`` and
``reset(conn, stream)`` return ``events.SessionEvent`` lists; ``send_request``,
``send_response``, ``open_channel``, ``channel_write``, ``channel_consumed``,
``transfers.open/send/finish/read``, ``adapt(now)``, ``take_touched()``.

Layers: ``dwcp.wire`` (sans-IO frames), ``stripe`` (sans-IO striping,
reassembly, lane choice), ``transfers`` (sans-IO bulk transfers), ``core`` and
``events`` (the sans-IO session protocol), ``admission`` (sans-IO handshake
budget), ``dwcp.pba.parallelism`` (parallelism controller, policies by name),
``bbr`` (rate-based congestion controller for aioquic), ``tls`` (certificates
from Ed25519 keys), ``quic`` (aioquic connection with trust check, paced
streams, link counters, Retry tokens; the only module touching aioquic
internals), ``aio`` (sockets, batched reads, timers), ``port`` (what channel
and bulk ends need from a session), ``channel`` and ``bulk`` (application
end-points), ``session`` (futures, queues and tasks over the core),
``handshake`` (the Hello exchange), ``server`` and ``api`` (serve, connect).
``testing`` holds a ClientHello flooder for tests and benchmarks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dwcp.transport.admission import AdmissionLimits
    from dwcp.transport.api import Server, connect, run, serve
    from dwcp.transport.bulk import BulkReceiver, BulkSender
    from dwcp.transport.channel import Channel
    from dwcp.transport.config import TransportConfig
    from dwcp.transport.session import Session

__all__ = [
    "AdmissionLimits",
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
    "AdmissionLimits": "admission",
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
