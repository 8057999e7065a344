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
import json
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwcp.consensus.actions import (
    Action,
    Broadcast,
    Compact,
    Completed,
    Executed,
    Persist,
    ReplyTo,
    Send,
    ViewChanged,
)
from dwcp.consensus.client import Client
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.conn import Endpoint, FrameProtocol, Link
from dwcp.consensus.handshake import (
    ROLE_CLIENTS,
    ROLE_REPLICA,
    DialerHandshake,
    ListenerHandshake,
    Peer,
    max_handshake_frame,
)
from dwcp.consensus.messages import Codec, Replies, Reply
from dwcp.consensus.registry import VMRegistry
from dwcp.consensus.replica import Replica
from dwcp.consensus.wal import Wal
from dwcp.errors import AuthenticationError, ConfigError, ConsensusError, ProtocolError
from dwcp.identity import NodeKey, PublicKey

log = logging.getLogger("dwcp.consensus")

MAX_PENDING_HANDSHAKES = 64
"""Connections a replica holds while they prove their keys; the oldest goes beyond it."""
MAX_CONNS_PER_PEER = 4
"""Authenticated connections kept per peer (a replica or a client pool's key set); a
newer one closes the oldest (a peer that restarted reconnects before its old connection
times out)."""
_TUNING = (
    "checkpoint_interval",
    "watermark_window",
    "max_batch",
    "max_inflight",
    "view_change_timeout",
    "client_retry",
)


@dataclass(frozen=True)
class NetConfig:
    """A cluster plus where each replica listens (``addresses[i]`` is replica ``i``)."""

    cluster: ClusterConfig
    addresses: tuple[tuple[str, int], ...]
    owner_check: bool = False
    """Replicas run ``VMRegistry(check_owner=True)``: clients act only for themselves."""

    def __post_init__(self) -> None:
        if len(self.addresses) != self.cluster.n:
            raise ConfigError(
                f"{len(self.addresses)} addresses for {self.cluster.n} replicas: "
                "list one host:port per replica"
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NetConfig:
        """Read the JSON written by ``dump`` (or ``init``)."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            cluster = ClusterConfig(
                bytes.fromhex(doc["cluster_id"]),
                tuple(PublicKey.parse(t) for t in doc["replicas"]),
                tuple(PublicKey.parse(t) for t in doc["clients"]),
                **{k: v for k, v in doc.get("tuning", {}).items() if k in _TUNING},
            )
            addrs = []
            for a in doc["addresses"]:
                host, _, port = str(a).rpartition(":")
                addrs.append((host, int(port)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{p}: not a valid cluster file ({type(exc).__name__}: {exc}); "
                "create one with 'python -m dwcp.consensus.net init DIR'"
            ) from exc
        owner_check = doc.get("owner_check", False)
        if type(owner_check) is not bool:
            raise ConfigError(f"{p}: owner_check: expected true or false")
        return cls(cluster, tuple(addrs), owner_check)

    def dump(self, path: str | os.PathLike[str]) -> None:
        c = self.cluster
        doc = {
            "cluster_id": c.cluster_id.hex(),
            "replicas": [k.text for k in c.replicas],
            "clients": [k.text for k in c.clients],
            "addresses": [f"{h}:{p}" for h, p in self.addresses],
            "tuning": {k: getattr(c, k) for k in _TUNING},
            "owner_check": self.owner_check,
        }
        Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


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


class ClientPool(Endpoint):
    """Many sans-IO ``Client``s (one per key) sharing one connection per replica."""

    def __init__(self, net: NetConfig, keys: Sequence[NodeKey]) -> None:
        self.net = net
        cfg = net.cluster
        self.limit = cfg.max_message_bytes + 64
        self.codec = Codec(cfg)
        self.clients = [Client(cfg, k, codec=self.codec) for k in keys]
        self.by_index = {c.index: c for c in self.clients}
        self._waiters: dict[int, asyncio.Future[Completed]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self.addresses = net.addresses
        self.links = {
            j: Link(self, j, functools.partial(DialerHandshake, cfg, keys, ROLE_CLIENTS, j))
            for j in range(cfg.n)
        }
        self._out: dict[int, list[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bad_signatures = 0

    def _ev(self) -> asyncio.AbstractEventLoop:
        # Cached: asyncio.get_running_loop() costs a getpid() per call on Python 3.11.
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
        return loop

    async def start(self, timeout: float = 10.0) -> None:
        """Dial every replica; return once all are connected (or raise after ``timeout``)."""
        for link in self.links.values():
            link.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while any(link.proto is None for link in self.links.values()):
            if loop.time() > end:
                raise ConsensusError(
                    "could not connect to every replica; check that they run and the "
                    "addresses in the cluster file"
                )
            await asyncio.sleep(0.01)

    def _perform(self, client: Client, actions: list[Action]) -> None:
        # Frames queued in one loop turn (many clients' requests) leave in one write per replica.
        out = self._out
        if not out:
            self._ev().call_soon(self._flush)
        for a in actions:
            if isinstance(a, Send):
                out.setdefault(a.to, []).append(a.data)
            elif isinstance(a, Broadcast):
                for j in self.links:
                    out.setdefault(j, []).append(a.data)
        old = self._timers.pop(client.index, None)
        if old is not None:
            old.cancel()
        dl = client.next_deadline()
        if dl is not None:
            self._timers[client.index] = self._ev().call_at(dl, self._on_timer, client)

    def _flush(self) -> None:
        out, self._out = self._out, {}
        for j, frames in out.items():
            self.links[j].send(frames)

    def _on_timer(self, client: Client) -> None:
        self._timers.pop(client.index, None)
        self._perform(client, client.tick(self._ev().time()))

    def on_frame(self, proto: FrameProtocol, data: bytes) -> None:
        try:
            s = self.codec.decode(data)
        except ProtocolError:
            return
        msg = s.msg
        if isinstance(msg, Reply):
            indices: Iterable[int] = (msg.client,)
        elif isinstance(msg, Replies):
            indices = dict.fromkeys(c for c, _, _ in msg.entries)
        else:
            return
        # Only clients still waiting (the first f+1 replies complete them).
        waiting = [c for c in map(self.by_index.get, indices) if c is not None and c.busy]
        if len(waiting) > 1:
            # Checked once here: a forged REPLIES naming all our clients must not cost a
            # verification per client (a valid one is then found in the shared codec's cache).
            try:
                self.codec.verify(s)
            except AuthenticationError:
                self.bad_signatures += 1
                return
        now = self._ev().time()
        for client in waiting:
            for ev in client.receive_decoded(s, now):
                waiter = self._waiters.pop(client.index, None)
                timer = self._timers.pop(client.index, None)
                if timer is not None:
                    timer.cancel()
                if waiter is not None and not waiter.done():
                    waiter.set_result(ev)

    async def request(
        self, op: bytes, client: int = 0, *, timeout: float | None = None
    ) -> Completed:
        """Submit ``op`` as ``clients[client]`` and wait for f + 1 matching replies.

        After ``timeout`` seconds raise ``ConsensusError`` and stop waiting (the request
        may still commit later; PBFT executes it at most once). Timestamps follow the
        wall clock, so they keep rising across restarts of a long-lived client.
        """
        c = self.clients[client]
        loop = self._ev()
        fut: asyncio.Future[Completed] = loop.create_future()
        self._waiters[c.index] = fut
        c.advance_timestamp(int(time.time() * 1_000_000))
        self._perform(c, c.request(op, loop.time()))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise ConsensusError(
                f"no f+1 matching replies within {timeout:g} s: fewer than 2f+1 replicas "
                "are reachable or agree; check 'dwcp status' on the replica nodes"
            ) from None
        finally:
            if not fut.done():
                self._waiters.pop(c.index, None)
                timer = self._timers.pop(c.index, None)
                if timer is not None:
                    timer.cancel()
                c.abandon()

    def close(self) -> None:
        for link in self.links.values():
            link.stop()
        for t in self._timers.values():
            t.cancel()


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
