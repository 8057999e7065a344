"""``dwcp-node``: the node daemon, in uvicorn's three phases.

startup    load the key, open the data directory, then start the services of
           ``SERVICES`` in order (the image index, the ownership client, the
           QUIC sessions, migrations, the node's own operations, metrics) and
           the control socket last;
main loop  serve until SIGTERM/SIGINT sets ``should_exit``; SIGHUP re-reads the
           config (``ExecReload``), logging an invalid one and keeping the running one;
shutdown   drain (refuse new work, give running transfers ``[limits]
           drain_seconds``, then stop them: receivers flush their journal and
           keep ``partial/ID`` so the same migration resumes after a restart),
           then stop the services in reverse order. A second signal skips the
           drain.

How to add a part to the node (a control operation, a service, a channel a
peer opens) is in ``dwcp.node.service``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import faulthandler
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from dwcp import __version__
from dwcp.errors import ConfigError, LocalError, UsageError
from dwcp.gossip.service import GossipService
from dwcp.identity import NodeKey, PublicKey
from dwcp.migrate import IndexWorker
from dwcp.node import metrics, notify
from dwcp.node.config import NodeConfig, load_config
from dwcp.node.context import NodeContext
from dwcp.node.control import ControlServer
from dwcp.node.jobs import Jobs
from dwcp.node.logs import setup_logging
from dwcp.node.metrics_http import MetricsEndpoint
from dwcp.node.migrations import Migrations
from dwcp.node.ops import NodeOps
from dwcp.node.ownership import Ownership
from dwcp.node.pulls import Pulls
from dwcp.node.service import BaseService, Service, ServiceSet
from dwcp.node.sessions import PeerSessions
from dwcp.node.store import Store
from dwcp.pba.paths import PathStore
from dwcp.tasks import cancel_and_wait, log_failure
from dwcp.vm.supervisor import VmSupervisor

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # bad configuration: fix the file named in the message
EXIT_STARTUP = 3  # could not start (port in use, node already running, index unreadable)

log = logging.getLogger("dwcp.node")
INITIAL_CONNECTIONS = 4
INITIAL_STREAMS = 4
REAP_SECONDS = 5.0  # bound on waiting for leftover (library) tasks at exit


async def cancel_and_wait_bounded(tasks: list[asyncio.Task[Any]], seconds: float) -> None:
    """Cancel ``tasks`` and wait at most ``seconds``; log those that did not stop."""
    for t in tasks:
        t.cancel()
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=seconds)
    for t in stuck:
        log.warning(
            "task did not stop: %r", t, extra={"event": "stuck_task", "stack": repr(t.get_stack())}
        )


class IndexService(BaseService):
    """The image index: opened (and synced with ``images/``) first, closed last."""

    name = "index"

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    async def start(self) -> None:
        await self.ctx.index.open(self.ctx.store.images_dir)

    async def stop(self) -> None:
        await self.ctx.index.close()


class OwnershipService(BaseService):
    """The PBFT ownership client (and this node's replica), with ``[consensus]``."""

    name = "ownership"

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    async def start(self) -> None:
        if self.ctx.ownership is not None:
            await self.ctx.ownership.start()
            self.ctx.stats.consensus = self.ctx.ownership.status

    async def stop(self) -> None:
        if self.ctx.ownership is not None:
            await self.ctx.ownership.close()


class ControlService(BaseService):
    """The control socket: started last (answering means every part is up), stopped first."""

    name = "control"

    def __init__(self, server: ControlServer) -> None:
        self.server = server

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.close()


# The node's services in start order (stopped in reverse). Each factory gets the
# context; add a new part of the node here (see dwcp.node.service).
SERVICES: tuple[Callable[[NodeContext], Service], ...] = (
    IndexService,
    OwnershipService,
    lambda ctx: ctx.sessions,
    Migrations,
    Pulls,
    NodeOps,
    GossipService,
    VmSupervisor,
    MetricsEndpoint,
)


class Node:
    """One running node; ``serve()`` runs the three phases."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = Store(config.data_dir)
        self.stats = metrics.NodeStats()
        self.ctx: NodeContext | None = None
        self.services = ServiceSet()
        self.control = ControlServer(config.control_path)
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self._config_mtime = self._mtime()
        self._reloads: set[asyncio.Task[None]] = set()

    # --- phases -------------------------------------------------------------------

    async def serve(self) -> None:
        self._capture_signals()
        await self.startup()
        try:
            await self.should_exit.wait()
        finally:
            await cancel_and_wait(*self._reloads)
            await self.shutdown()
            await self._reap_tasks()

    async def _reap_tasks(self) -> None:
        """Cancel what is left (a bug: every service stops its own tasks), bounded, so the
        loop can close."""
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if left:
            log.warning(
                "%d task(s) left after shutdown: %s",
                len(left),
                [t.get_coro() for t in left],
                extra={"event": "leftover_tasks"},
            )
        await cancel_and_wait_bounded(left, REAP_SECONDS)

    def build(self, key: NodeKey) -> NodeContext:
        """The shared context and the services (before anything starts)."""
        from dwcp.transport import TransportConfig

        c = self.config
        # Migrations are short bulk transfers: start with several connections (each its own
        # congestion controller) rather than wait for the adaptive controller to probe up;
        # on a lossy WAN one loss-based controller alone collapses.
        tc = TransportConfig(
            idle_timeout=c.limits.idle_timeout,
            initial_connections=INITIAL_CONNECTIONS,
            initial_streams=INITIAL_STREAMS,
        )
        ctx = NodeContext(
            config=c,
            key=key,
            store=self.store,
            stats=self.stats,
            index=IndexWorker(self.store.index_path),
            sessions=PeerSessions(key, c.listen, self._trusted, tc),
            ownership=(
                Ownership(c.consensus, key, c.data_dir / "consensus")
                if c.consensus is not None
                else None
            ),
            started=time.time(),
            reload=self.reload,
        )
        self.stats.links = ctx.sessions.links
        ctx.sessions.paths = PathStore(c.data_dir / "paths")  # warm starts on known paths
        for make in SERVICES:
            self.services.add(make(ctx))
        migrations = self.services.get("migrations")
        if isinstance(migrations, Migrations):  # 'dwcp jobs' follows its migrations
            self.services.add(Jobs(migrations, c.data_dir / "jobs.json"))
        for op, handler in self.services.handlers().items():
            self.control.add(op, handler)
        self.services.add(ControlService(self.control))
        return ctx

    async def startup(self) -> None:
        self.store.check()
        key = NodeKey.load(self.config.key_path)
        max_age = self.config.limits.partial_max_age_days * 86400
        for tid in self.store.drop_stale_transfers(max_age, time.time()):
            log.info("removed stale partial transfer %s", tid, extra={"event": "partial_gc"})
        self.ctx = self.build(key)
        await self.services.start()
        # The QUIC server is bound only once there is a peer to trust: say which it is.
        listening = self.ctx.sessions.server is not None
        log.info(
            "node %s ready: %s %s (udp), control %s",
            self.config.name,
            "listening on" if listening else "no peers yet, so not listening on",
            self.config.listen,
            self.config.control_path,
            extra={
                "event": "ready",
                "node_id": key.node_id,
                "public_key": key.public.text,
                "peers": [p.name for p in self.config.peers],
            },
        )
        notify.notify("READY=1", f"STATUS=node {self.config.name} ready")

    async def shutdown(self) -> None:
        notify.notify("STOPPING=1", "STATUS=draining running transfers")
        if self.ctx is not None:
            self.ctx.draining = True
        loop = asyncio.get_running_loop()
        drain = 0.0 if self.force_exit else self.config.limits.drain_seconds
        await self.services.drain(loop.time() + drain)
        await self.services.stop()
        log.info("node stopped", extra={"event": "stopped"})

    def _capture_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        loop.add_signal_handler(signal.SIGHUP, self.handle_hup)

    def handle_hup(self) -> None:
        """SIGHUP: reload the config in the background (systemd's ``ExecReload``)."""
        log.info("received SIGHUP: reloading %s", self.config.path, extra={"event": "signal"})
        task = asyncio.get_running_loop().create_task(self._reload_on_signal())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        task.add_done_callback(log_failure)

    async def _reload_on_signal(self) -> None:
        self._config_mtime = -1  # a signal reloads even when the mtime looks unchanged
        notify.reloading()
        try:
            await self.reload()
        except LocalError as exc:
            log.error(
                "reload failed, still running the previous config: %s",
                exc,
                extra={"event": "reload_failed"},
            )
        finally:
            notify.notify("READY=1")  # the reload is over, whichever way it went

    def handle_exit(self, sig: int = signal.SIGTERM) -> None:
        """First signal: drain and stop; second: stop without waiting."""
        if self.should_exit.is_set():
            self.force_exit = True
        log.info("received %s", signal.Signals(sig).name, extra={"event": "signal"})
        self.should_exit.set()

    # --- config -------------------------------------------------------------------

    def _mtime(self) -> int:
        try:
            return self.config.path.stat().st_mtime_ns
        except OSError:
            return 0

    def _trusted(self) -> list[PublicKey]:
        return [p.public_key for p in self.config.peers]

    async def reload(self) -> None:
        """Re-read the config's peers (added by ``dwcp peers add``) if the file changed."""
        mtime = self._mtime()
        if mtime == self._config_mtime:
            return
        new = load_config(self.config.path)
        if new.consensus != self.config.consensus:
            log.warning(
                "[consensus] changed in %s: restart the node to apply it",
                new.path,
                extra={"event": "reload_consensus"},
            )
            new = dataclasses.replace(new, consensus=self.config.consensus)
        self.config = new
        self._config_mtime = mtime
        if self.ctx is not None:
            self.ctx.config = new
        await self.services.reload()
        log.info("reloaded peers", extra={"event": "reload", "peers": [p.name for p in new.peers]})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwcp-node", description="Run a dwcp node in the foreground.")
    p.add_argument("--config", required=True, metavar="FILE", help="node.toml (see 'dwcp init')")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"dwcp-node {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dwcp-node``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        store = Store(config.data_dir)
        store.check()
        setup_logging(store, args.log_level)
    except (ConfigError, UsageError) as exc:
        print(f"dwcp-node: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` dumps every thread's stack
    node = Node(config)
    try:
        from dwcp.transport import run

        run(node.serve())
    except (LocalError, OSError) as exc:
        print(f"dwcp-node: error: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
