"""Thin asyncio binding: PBFT replicas as processes talking length-prefixed frames over TCP.

Why this shape: the cores are sans-IO, so this module only moves bytes, keeps
time (``loop.time()``, monotonic) and makes ``Persist``/``Compact`` durable.
Actions produced while handling everything that arrived in one event-loop
turn are performed together: the WAL is written and fsync'd once (group
commit), and only then are that turn's messages sent, so "durable before it
is sent" holds for every record without one fsync per message. The messages
of one turn go to the core together (``Replica.receive_batch``), so requests
that arrived together share one PRE-PREPARE. Each turn's frames leave in one
write per connection (a client pool's replies share its connection, and a
batch's REPLIES goes to it once); a client pool likewise sends the requests
of one turn in one write per replica.

Wire: each frame is ``u32 big-endian length`` + bytes. The first frame of a
connection is a hello: ``b"R" + u16 replica id`` from a replica, or ``b"C" +
32-byte client keys`` from a client pool (one connection may carry many
clients). Hellos are routing hints only: every message is signed, so a
spoofed hello can at worst divert a client's replies (the client then
retries to all replicas). Frames above the configured message limit close
the connection; peers' write buffers are capped and overflow is dropped
(PBFT retransmits through its timers), so memory stays bounded.

``NetConfig`` (the cluster file) lives in ``dwcp.consensus.netconfig`` and
``ClientPool`` in ``dwcp.consensus.clientpool``; both are re-exported here.

Entry points::

    python -m dwcp.consensus.net init DIR --n 4 --clients 1 --base-port 7400
    python -m dwcp.consensus.net replica --config DIR/cluster.json --id 0 \\
        --key DIR/replica-0.key --wal DIR/replica-0.wal [--new | --recovering]

``--new`` creates the log on first start; without it a missing log is an error
(a replica must never silently forget its votes), and ``--recovering`` rejoins
after losing the log without voting until it has caught up.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dwcp.consensus.actions import (
    Action,
    Broadcast,
    Compact,
    Executed,
    Persist,
    ReplyTo,
    Send,
    ViewChanged,
)
from dwcp.consensus.clientpool import ClientPool as ClientPool
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.conn import Endpoint, FrameProtocol, Link
from dwcp.consensus.handshake import (
    ROLE_REPLICA,
    DialerHandshake,
    ListenerHandshake,
    Peer,
    max_handshake_frame,
)
from dwcp.consensus.netconfig import NetConfig as NetConfig
from dwcp.consensus.registry import VMRegistry
from dwcp.consensus.replica import Replica
from dwcp.consensus.wal import Wal
from dwcp.errors import ConfigError, ConsensusError
from dwcp.identity import NodeKey

log = logging.getLogger("dwcp.consensus")

MAX_PENDING_HANDSHAKES = 64
"""Connections a replica holds while they prove their keys; the oldest goes beyond it."""
MAX_CONNS_PER_PEER = 4
"""Authenticated connections kept per peer (a replica or a client pool's key set); a
newer one closes the oldest (a peer that restarted reconnects before its old connection
times out)."""


class ReplicaServer(Endpoint):
    """Runs one sans-IO ``Replica`` on loopback/TCP with a fsync'd WAL."""

    def __init__(
        self,
        net: NetConfig,
        replica_id: int,
        key: NodeKey,
        wal_path: str | os.PathLike[str],
        *,
        recovering: bool = False,
        create: bool = False,
        app: VMRegistry | None = None,
        sync_in_thread: bool = False,
    ) -> None:
        self.net = net
        cfg = net.cluster
        self.limit = cfg.max_message_bytes + 64
        self.id = replica_id
        self.app = app if app is not None else VMRegistry(check_owner=net.owner_check)
        self.replica = Replica(cfg, replica_id, key, self.app, recovering=recovering)
        wal_file = Path(wal_path)
        if recovering and wal_file.exists():
            # A log we no longer trust is kept aside for inspection, never replayed.
            wal_file.replace(wal_file.with_name(wal_file.name + ".lost"))
        self.wal = Wal(
            wal_file,
            cluster_id=cfg.cluster_id,
            replica_id=replica_id,
            public_key=key.public.raw,
            create=recovering or create,
        )
        self.key = key
        self.addresses = net.addresses
        self.links: dict[int, Link] = {}
        self.clients: dict[bytes, FrameProtocol] = {}
        self._handshaking: dict[FrameProtocol, None] = {}
        self._peers: dict[object, list[FrameProtocol]] = {}
        self._peer_of: dict[FrameProtocol, object] = {}
        self.executed = 0
        self.view = 0
        self.core_errors = 0
        self._pending: list[Action] = []
        self._inbox: list[bytes] = []
        self._flush_scheduled = False
        self.sync_in_thread = sync_in_thread
        self._syncing = False
        self.stopped: asyncio.Future[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wal")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._server: asyncio.Server | None = None
        self._records = self.wal.replay()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepted: set[FrameProtocol] = set()
        self._closed = False

    async def start(self) -> None:
        # Cached: asyncio.get_running_loop() costs a getpid() per call on Python 3.11.
        self._loop = loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        host, port = self.net.addresses[self.id]
        self._server = await loop.create_server(
            self._accept,
            host,
            port,
            reuse_address=True,
        )
        cfg = self.net.cluster
        for j in range(cfg.n):
            if j != self.id:
                link = Link(self, j, functools.partial(self._dialler, j))
                self.links[j] = link
                link.start()
        self._queue(self.replica.recover(self._records, loop.time()))

    def _dialler(self, target: int) -> DialerHandshake:
        return DialerHandshake(self.net.cluster, [self.key], ROLE_REPLICA, target)

    def _accept(self) -> FrameProtocol:
        """A new connection: kept (in a bounded set) only while it proves its key."""
        hs = ListenerHandshake(self.net.cluster, self.key)

        def on_handshake(proto: FrameProtocol, data: bytes) -> bool:
            reply = hs.receive(data)
            if reply is not None:
                proto.send([reply])
                return False
            assert hs.peer is not None
            self._admit(proto, hs.peer)
            return True

        proto = FrameProtocol(
            self.limit,
            self.on_frame,
            self._lost,
            handshake=on_handshake,
            hs_limit=max_handshake_frame(self.net.cluster),
        )
        self._accepted.add(proto)
        self._handshaking[proto] = None
        while len(self._handshaking) > MAX_PENDING_HANDSHAKES:
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            oldest.close()
        return proto

    def _admit(self, proto: FrameProtocol, peer: Peer) -> None:
        """The peer proved its keys: route its clients' replies here; cap its connections."""
        self._handshaking.pop(proto, None)
        who: object = peer.replica if peer.replica is not None else peer.clients
        conns = self._peers.setdefault(who, [])
        conns.append(proto)
        self._peer_of[proto] = who
        while len(conns) > MAX_CONNS_PER_PEER:
            conns.pop(0).close()
        for key in peer.clients:
            self.clients[key] = proto

    def _lost(self, proto: FrameProtocol) -> None:
        self._accepted.discard(proto)
        self._handshaking.pop(proto, None)
        who = self._peer_of.pop(proto, None)
        if who is not None:
            conns = self._peers.get(who, [])
            if proto in conns:
                conns.remove(proto)
            if not conns:
                self._peers.pop(who, None)
        for k in [k for k, p in self.clients.items() if p is proto]:
            del self.clients[k]

    def on_frame(self, proto: FrameProtocol, data: bytes) -> None:
        if self._closed:
            return
        # Handled at the end of the loop turn, with everything else that arrived in it.
        self._inbox.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._ev().call_soon(self._flush)

    def _receive_inbox(self) -> None:
        inbox, self._inbox = self._inbox, []
        try:
            actions = self.replica.receive_batch(inbox, self._time())
        except Exception as exc:  # the core must not raise on input; never let a peer crash us
            self.core_errors += 1
            if self.core_errors == 1:
                log.error("replica %d: input raised %r (dropped)", self.id, exc)
            return
        self._pending.extend(actions)

    def _ev(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
        return loop

    def _time(self) -> float:
        return self._ev().time()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._queue(self.replica.tick(self._time()))

    def _queue(self, actions: list[Action]) -> None:
        """Collect this loop turn's actions; ``_flush`` runs once per turn and re-arms timers."""
        self._pending.extend(actions)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._ev().call_soon(self._flush)

    def _flush(self) -> None:
        """Group commit: make every queued record durable, then send this turn's messages.

        With ``sync_in_thread`` the write+fsync runs in a worker thread so the loop keeps
        receiving and verifying meanwhile; everything queued during a sync waits for the
        next one (a later action may depend on an earlier record, so nothing overtakes).
        """
        self._flush_scheduled = False
        if self._closed:
            return
        if self._inbox:
            self._receive_inbox()
        self._rearm()
        if self._syncing or not self._pending:
            return
        actions, self._pending = self._pending, []
        if self.sync_in_thread and any(isinstance(a, Persist | Compact) for a in actions):
            self._syncing = True
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._executor, self.wal.perform, actions)
            fut.add_done_callback(self._synced)
            return
        self._send(self.wal.perform(actions))

    def _synced(self, fut: asyncio.Future[list[Action]]) -> None:
        self._syncing = False
        try:
            rest = fut.result()
        except Exception as exc:
            # It may not send what it could not persist: stop taking part at once.
            self.fail(exc)
            return
        self._send(rest)
        self._flush()

    def fail(self, exc: BaseException) -> None:
        """Stop this replica after a local failure (the WAL could not be written)."""
        log.error("replica %d: stopping: %r", self.id, exc)
        self._pending.clear()
        self.close()
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_exception(exc)

    def _send(self, rest: list[Action]) -> None:
        # One write per connection per turn: a client pool's replies share its connection.
        to_peer: dict[int, list[bytes]] = defaultdict(list)
        to_client: dict[FrameProtocol, dict[bytes, None]] = defaultdict(dict)
        clients = self.clients
        for a in rest:
            if isinstance(a, Send):
                to_peer[a.to].append(a.data)
            elif isinstance(a, Broadcast):
                for j in self.links:
                    to_peer[j].append(a.data)
            elif isinstance(a, ReplyTo):
                proto = clients.get(a.client)
                if proto is not None:  # a batch's REPLIES goes once to each connection
                    to_client[proto][a.data] = None
            elif isinstance(a, Executed):
                self.executed += 1
            elif isinstance(a, ViewChanged):
                self.view = a.view
                log.info("replica %d: view %d primary %d", self.id, a.view, a.primary)
        for j, frames in to_peer.items():
            link = self.links.get(j)
            if link is not None:
                link.send(frames)
        for proto, datas in to_client.items():
            proto.send(list(datas))

    def _rearm(self) -> None:
        dl = self.replica.next_deadline()
        if dl == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = dl
        if dl is not None:
            self._timer = self._ev().call_at(dl, self._on_timer)

    def close(self) -> None:
        """Stop: no more input is handled, connections close, the log is closed last."""
        if self._closed:
            return
        self._closed = True
        for link in self.links.values():
            link.stop()
        if self._server is not None:
            self._server.close()
        for proto in list(self._accepted):
            proto.close()
        if self._timer is not None:
            self._timer.cancel()
        self._executor.shutdown(wait=True)  # let an fsync in flight finish first
        self.wal.close()


# --- command line ----------------------------------------------------------


def init_cluster(
    directory: str | os.PathLike[str],
    *,
    n: int = 4,
    clients: int = 1,
    host: str = "127.0.0.1",
    base_port: int = 7400,
    cluster_id: bytes | None = None,
    **tuning: Any,
) -> NetConfig:
    """Write ``replica-I.key``, ``client-J.key`` and ``cluster.json`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rkeys = [NodeKey.generate() for _ in range(n)]
    ckeys = [NodeKey.generate() for _ in range(clients)]
    for i, k in enumerate(rkeys):
        k.save(d / f"replica-{i}.key", overwrite=True)
    for j, k in enumerate(ckeys):
        k.save(d / f"client-{j}.key", overwrite=True)
    cfg = ClusterConfig(
        cluster_id or os.urandom(8),
        tuple(k.public for k in rkeys),
        tuple(k.public for k in ckeys),
        **tuning,
    )
    net = NetConfig(cfg, tuple((host, base_port + i) for i in range(n)))
    net.dump(d / "cluster.json")
    return net


async def _serve(args: argparse.Namespace) -> None:
    net = NetConfig.load(args.config)
    server = ReplicaServer(
        net,
        args.id,
        NodeKey.load(args.key),
        args.wal,
        recovering=args.recovering,
        create=args.new,
        sync_in_thread=args.sync_thread,
    )
    await server.start()
    assert server.stopped is not None
    log.info("replica %d: listening on %d", args.id, net.addresses[args.id][1])
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    try:
        await asyncio.wait([stop, server.stopped], return_when=asyncio.FIRST_COMPLETED)
        if server.stopped.done():
            server.stopped.result()  # re-raise the failure that stopped the replica
    finally:
        server.close()


def run(coro: Any) -> Any:
    """Run ``coro`` on uvloop when it is installed (faster), else on asyncio's loop."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dwcp.consensus.net", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="write keys and a cluster file for a loopback cluster")
    p_init.add_argument("dir")
    p_init.add_argument("--n", type=int, default=4)
    p_init.add_argument("--clients", type=int, default=1)
    p_init.add_argument("--host", default="127.0.0.1")
    p_init.add_argument("--base-port", type=int, default=7400)
    p_init.add_argument("--view-change-timeout", type=float, default=1.0)
    p_rep = sub.add_parser("replica", help="run one replica until SIGTERM")
    p_rep.add_argument("--config", required=True)
    p_rep.add_argument("--id", type=int, required=True)
    p_rep.add_argument("--key", required=True)
    p_rep.add_argument("--wal", required=True)
    p_rep.add_argument("--new", action="store_true", help="first start: create the log")
    p_rep.add_argument(
        "--sync-thread",
        action="store_true",
        help="fsync in a worker thread while the loop keeps verifying (costs ~25%% more CPU "
        "per commit with one client; measured no clear gain batched on 2 shared cores)",
    )
    p_rep.add_argument(
        "--recovering",
        action="store_true",
        help="this replica lost its log: rejoin without voting until it has caught up",
    )
    args = ap.parse_args(argv)
    # A replica process logs to stdout (its parent keeps that as the replica's log).
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s", force=True)
    try:
        if args.cmd == "init":
            init_cluster(
                args.dir,
                n=args.n,
                clients=args.clients,
                host=args.host,
                base_port=args.base_port,
                view_change_timeout=args.view_change_timeout,
            )
            print(f"wrote {args.dir}/cluster.json and keys", flush=True)
        else:
            run(_serve(args))
    except (ConfigError, ConsensusError, OSError) as exc:  # WalError is an OSError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
