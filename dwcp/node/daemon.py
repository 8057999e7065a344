"""``dwcp-node``: the node daemon, in uvicorn's three phases.

startup    load the key, open the data directory and image index (syncing it
           with ``images/``), bind the control socket, metrics and transport;
main loop  serve until SIGTERM/SIGINT sets ``should_exit``;
shutdown   refuse new work, give running transfers ``[limits] drain_seconds``
           to finish, then cancel the rest: receivers flush their journal and
           keep ``partial/ID`` so the same migration resumes after a restart.
           A second signal skips the drain.

The node's operations (``migrate``, ``images``, ``status``, ``peers``,
``reload``) are plain async methods that the control socket dispatches to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from dwcp import __version__
from dwcp.errors import (
    ConfigError,
    ConsensusError,
    DwcpError,
    ImageError,
    LocalError,
    RemoteError,
    UsageError,
)
from dwcp.identity import NodeKey, PublicKey
from dwcp.migrate import aio
from dwcp.node import metrics
from dwcp.node.config import NodeConfig, load_config, parse_rate
from dwcp.node.control import ControlServer
from dwcp.node.link import NodeLink, QuicChannel
from dwcp.node.ownership import Claim, Ownership
from dwcp.node.store import Store, check_image_name
from dwcp.pba.compression import MAX_LEVEL, MIN_LEVEL, AdaptiveLevel

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # bad configuration: fix the file named in the message
EXIT_STARTUP = 3  # could not start (port in use, node already running, index unreadable)

log = logging.getLogger("dwcp.node")
PROGRESS_INTERVAL = 0.1  # seconds between progress lines to the CLI
INITIAL_CONNECTIONS = 4
INITIAL_STREAMS = 4


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _skip: ClassVar[set[str]] = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._skip and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(store: Store, level: str) -> None:
    root = logging.getLogger("dwcp")
    root.setLevel(level.upper())
    root.handlers.clear()
    fh = logging.FileHandler(store.log_path, encoding="utf-8")
    fh.setFormatter(JsonFormatter())
    root.addHandler(fh)
    eh = logging.StreamHandler(sys.stderr)
    eh.setFormatter(logging.Formatter("dwcp-node: %(message)s"))
    root.addHandler(eh)
    root.propagate = False


class Node:
    """One running node; ``serve()`` runs the three phases."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = Store(config.data_dir)
        self.key: NodeKey | None = None
        self.stats = metrics.NodeStats()
        self.registry = metrics.make_registry(self.stats)
        self.index = aio.IndexWorker(self.store.index_path)
        self.link: NodeLink | None = None
        self.ownership: Ownership | None = None
        self.control = ControlServer(
            config.control_path,
            {
                "status": self.op_status,
                "images": self.op_images,
                "peers": self.op_peers,
                "migrate": self.op_migrate,
                "reload": self.op_reload,
                "owner": self.op_owner,
            },
        )
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.draining = False
        self.started = time.time()
        self.incoming: dict[str, asyncio.Task[Any]] = {}
        self.outgoing: set[asyncio.Task[Any]] = set()
        self.migrating: set[str] = set()  # names being sent: one migration per VM at a time
        self.slots = asyncio.Semaphore(config.limits.max_transfers)
        self._metrics_server: asyncio.base_events.Server | None = None
        self._config_mtime = self._mtime()

    # --- phases -------------------------------------------------------------------

    async def serve(self) -> None:
        self._capture_signals()
        await self.startup()
        try:
            await self.should_exit.wait()
        finally:
            await self.shutdown()
            await self._reap_tasks()

    async def _reap_tasks(self) -> None:
        """Cancel what is left (library tasks included) so the loop can close, bounded."""
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        for t in left:
            t.cancel()
        if left:
            log.debug("cancelling %d leftover task(s): %s", len(left), [t.get_coro() for t in left])
            _, stuck = await asyncio.wait(left, timeout=5)
            for t in stuck:
                log.warning(
                    "task did not stop: %r",
                    t,
                    extra={"event": "stuck_task", "stack": repr(t.get_stack())},
                )

    async def startup(self) -> None:
        self.store.check()
        self.key = NodeKey.load(self.config.key_path)
        max_age = self.config.limits.partial_max_age_days * 86400
        for tid in self.store.drop_stale_transfers(max_age, time.time()):
            log.info("removed stale partial transfer %s", tid, extra={"event": "partial_gc"})
        await self.index.open(self.store.images_dir)
        if self.config.consensus is not None:
            self.ownership = Ownership(
                self.config.consensus, self.key, self.config.data_dir / "consensus"
            )
            await self.ownership.start()
            self.stats.consensus = self.ownership.status
        await self.control.start()
        from dwcp.transport import TransportConfig

        # Migrations are short bulk transfers: start with several connections (each its own
        # congestion controller) rather than wait for the adaptive controller to probe up;
        # on a lossy WAN one loss-based controller alone collapses.
        tc = TransportConfig(
            idle_timeout=self.config.limits.idle_timeout,
            initial_connections=INITIAL_CONNECTIONS,
            initial_streams=INITIAL_STREAMS,
        )
        self.link = NodeLink(self.key, self.config.listen, tc)
        self.stats.links = self.link.links
        await self.link.start(self._trusted(), self._on_incoming)
        if self.config.metrics_listen is not None:
            m = self.config.metrics_listen
            self._metrics_server = await asyncio.start_server(self._serve_metrics, m.host, m.port)
        log.info(
            "node %s ready: listening on %s (udp), control %s",
            self.config.name,
            self.config.listen,
            self.config.control_path,
            extra={
                "event": "ready",
                "node_id": self.key.node_id,
                "public_key": self.key.public.text,
                "peers": [p.name for p in self.config.peers],
            },
        )

    async def shutdown(self) -> None:
        self.draining = True
        if self.link is not None:
            self.link.accepting = False
        tasks = [*self.incoming.values(), *self.outgoing]
        if tasks and not self.force_exit:
            drain = self.config.limits.drain_seconds
            log.info(
                "draining %d transfer(s) for up to %.0f s",
                len(tasks),
                drain,
                extra={"event": "draining"},
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain
            while not self.force_exit and (left := deadline - loop.time()) > 0:
                pending = [t for t in (*self.incoming.values(), *self.outgoing) if not t.done()]
                if not pending:
                    break
                await asyncio.wait(pending, timeout=min(0.1, left))
        stragglers = [t for t in (*self.incoming.values(), *self.outgoing) if not t.done()]
        for t in stragglers:
            t.cancel()
        for t in stragglers:
            with contextlib.suppress(BaseException):
                await t
        if stragglers:
            log.info(
                "stopped %d transfer(s); they resume when re-run",
                len(stragglers),
                extra={"event": "stopped_transfers"},
            )
        await self.control.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self.link is not None:
            await self.link.close()
        if self.ownership is not None:
            await self.ownership.close()
        await self.index.close()
        log.info("node stopped", extra={"event": "stopped"})

    def _capture_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig)

    def handle_exit(self, sig: int = signal.SIGTERM) -> None:
        """First signal: drain and stop; second: stop without waiting."""
        if self.should_exit.is_set():
            self.force_exit = True
        log.info("received %s", signal.Signals(sig).name, extra={"event": "signal"})
        self.should_exit.set()

    # --- helpers ------------------------------------------------------------------

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
        if self.link is not None:
            await self.link.update_trust(self._trusted())
        log.info("reloaded peers", extra={"event": "reload", "peers": [p.name for p in new.peers]})

    async def _serve_metrics(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(5):  # bounded: a scraper sends a few short lines
                line = await reader.readline()
                for _ in range(100):
                    if await reader.readline() in (b"\r\n", b"\n", b""):
                        break
            ok = line.split(b" ")[1:2] == [b"/metrics"]
            body = metrics.render(self.registry) if ok else b"see /metrics\n"
            status = b"200 OK" if ok else b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
            )
            writer.write(body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    # --- incoming migrations ------------------------------------------------------------

    async def _on_incoming(self, peer_key: PublicKey, chan: QuicChannel) -> None:
        peer = self.config.peer_by_key(peer_key.raw)
        peer_name = peer.name if peer is not None else peer_key.node_id
        if self.draining:
            return
        hooks = aio.ReceiverHooks(
            images_dir=self.store.images_dir,
            partial_dir=self.store.transfer_dir,
            check_name=check_image_name,
            index=self.index,
            max_image_bytes=self.config.limits.max_image_bytes,
            claim=self._claim,
            release=self._release,
            on_bytes=self._on_bytes_in,
            on_plan=self._on_plan_in,
            admit=self._admit,
            commit=self.commit_migration,
        )
        self.stats.active_in += 1
        t0 = time.monotonic()
        try:
            name = await aio.receive_image(chan, peer_key, hooks)
        except asyncio.CancelledError:
            self.stats.count_migration("in", "stopped")
            raise
        finally:
            self.stats.active_in -= 1
        if name is None:
            self.stats.count_migration("in", "failed")
            log.info("incoming migration from %s failed", peer_name, extra={"event": "in_failed"})
        else:
            self.stats.count_migration("in", "ok")
            log.info(
                "received image %s from %s in %.2f s",
                name,
                peer_name,
                time.monotonic() - t0,
                extra={"event": "in_ok", "image": name, "peer": peer_name},
            )

    async def _admit(self, name: str, source: PublicKey) -> None:
        """With consensus, refuse an image over a VM this node owns (it may be running it)
        or for a VM that a third node owns: defence in depth, since a source that claims
        first never sends such an offer, but a source without ``[consensus]`` would."""
        if self.ownership is None:
            return
        try:
            got = await self.ownership.owner(name)
        except ConsensusError as exc:
            raise UsageError(f"cannot check who owns VM {name}: {exc}") from None
        if got.owner == self.ownership.me:
            raise UsageError(
                f"the destination owns VM {name} (epoch {got.epoch}) and will not overwrite "
                "its disk; migrate it from the destination instead"
            )
        if got.owner and got.owner != source.node_id:
            raise UsageError(
                f"VM {name} is owned by node {got.owner} (epoch {got.epoch}), not by the "
                "sending node; migrate it from its owner"
            )

    async def commit_migration(self, name: str, sha256: bytes, source: PublicKey) -> None:
        """Record a received image (the log line; with consensus the source commits the
        ownership move after this node's Ack: ``dwcp.node.ownership``)."""
        log.info(
            "stored image %s sha256 %s from %s",
            name,
            sha256.hex(),
            source.node_id,
            extra={"event": "commit", "image": name, "sha256": sha256.hex()},
        )

    async def _claim(self, transfer_id: str) -> None:
        """One task per transfer id: a newer session for it replaces a stale one."""
        old = self.incoming.get(transfer_id)
        me = asyncio.current_task()
        if old is not None and old is not me and not old.done():
            old.cancel()
            with contextlib.suppress(BaseException):
                await old
        assert me is not None
        busy = sum(1 for t in self.incoming.values() if not t.done())
        if busy >= self.config.limits.max_transfers:
            raise RemoteError(
                "busy",
                f"the destination already runs {busy} incoming transfers "
                "([limits] max_transfers); retry later",
            )
        self.incoming[transfer_id] = me

    def _release(self, transfer_id: str) -> None:
        if self.incoming.get(transfer_id) is asyncio.current_task():
            del self.incoming[transfer_id]

    def _on_bytes_in(self, wire: int, raw: int) -> None:
        self.stats.bytes_received += wire

    def _on_plan_in(self, image: int, dedup: int) -> None:
        self.stats.bytes_deduplicated += dedup

    # --- control operations ---------------------------------------------------------------

    async def op_status(self, args: dict[str, Any], emit: Any) -> dict[str, Any]:
        assert self.key is not None
        images = await self.index.call(lambda ix: len(ix.images()))
        c = self.config
        return {
            "name": c.name,
            "node_id": self.key.node_id,
            "public_key": self.key.public.text,
            "listen": str(c.listen),
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started, 1),
            "data_dir": str(c.data_dir),
            "images": images,
            "partial_transfers": self.store.partial_transfers(),
            "peers": [p.name for p in c.peers],
            "stats": self.stats.snapshot(),
            "consensus": self.ownership.status() if self.ownership is not None else None,
            "draining": self.draining,
        }

    async def op_images(self, args: dict[str, Any], emit: Any) -> list[dict[str, Any]]:
        d = self.store.images_dir.resolve()

        def listing(ix: Any) -> list[dict[str, Any]]:
            ix.sync_dir(d)
            return [
                {"name": r.path.name, "size": r.size, "sha256": r.sha256, "mtime_ns": r.mtime_ns}
                for r in ix.images()
                if r.path.parent == d
            ]

        return await self.index.call(listing)

    async def op_peers(self, args: dict[str, Any], emit: Any) -> list[dict[str, Any]]:
        await self.reload()
        peers = self.config.peers
        link = self.link
        probes = await asyncio.gather(
            *(link.probe(p) if link is not None else asyncio.sleep(0) for p in peers)
        )
        return [
            {
                "name": p.name,
                "address": str(p.address),
                "public_key": p.public_key.text,
                "node_id": p.public_key.node_id,
                "reachable": rtt is not None,
                "connect_seconds": None if rtt is None else round(rtt, 4),
            }
            for p, rtt in zip(peers, probes, strict=True)
        ]

    async def op_owner(self, args: dict[str, Any], emit: Any) -> dict[str, Any]:
        if self.ownership is None:
            raise UsageError("this node has no [consensus] section: VM ownership is not tracked")
        vm = check_image_name(str(args.get("vm", "")))
        got = await self.ownership.owner(vm)
        owner = got.owner or None
        peer = next((p.name for p in self.config.peers if p.public_key.node_id == owner), None)
        if owner is not None and owner == self.ownership.me:
            peer = self.config.name
        return {"vm": vm, "owner": owner, "owner_name": peer, "epoch": got.epoch}

    async def op_reload(self, args: dict[str, Any], emit: Any) -> dict[str, Any]:
        await self.reload()
        return {"peers": [p.name for p in self.config.peers]}

    async def op_migrate(self, args: dict[str, Any], emit: Any) -> dict[str, Any]:
        if self.draining:
            raise UsageError("the node is shutting down; re-run when it is back")
        await self.reload()
        peer = self.config.peer(str(args.get("to", "")))
        image = self._source_path(str(args.get("image", "")))
        name = check_image_name(str(args.get("name") or image.name))
        level: int | AdaptiveLevel
        if args.get("level"):  # an explicit --level is kept for the whole transfer
            level = int(args["level"])
            if not -7 <= level <= 19:
                raise UsageError(f"--level {level}: expected -7..19")
        else:  # adapt to whichever of the network and the CPU is the bottleneck
            start = self.config.limits.level
            level = AdaptiveLevel(start, lo=min(start, MIN_LEVEL), hi=max(start, MAX_LEVEL))
        try:
            bw = parse_rate(args["bwlimit"]) if args.get("bwlimit") else self.config.limits.bwlimit
        except ValueError as exc:
            raise UsageError(f"--bwlimit: {exc}") from None
        if name in self.migrating:
            raise UsageError(
                f"{name} is already being migrated from this node; wait for that migration "
                "(two at once could both copy it, and only one can move its ownership)"
            )
        task = asyncio.current_task()
        assert task is not None and self.key is not None and self.link is not None
        self.outgoing.add(task)
        self.migrating.add(name)
        last: dict[str, Any] = {"t": 0.0, "phase": ""}

        def progress(p: aio.Progress) -> None:
            now = time.monotonic()
            if now - last["t"] >= PROGRESS_INTERVAL or p.phase != last["phase"]:
                last["t"], last["phase"] = now, p.phase
                emit(
                    {
                        "phase": p.phase,
                        "bytes_image": p.bytes_image,
                        "bytes_missing": p.bytes_missing,
                        "bytes_to_send": p.bytes_to_send,
                        "bytes_sent": p.bytes_sent,
                        "bytes_wire": p.bytes_wire,
                        "dedup_ratio": round(p.dedup_ratio, 4),
                    }
                )

        t0 = time.monotonic()
        try:
            async with self.slots:
                self.stats.active_out += 1
                try:
                    # Connect while the VM is claimed and the image scanned (~0.1 s and
                    # a handshake's round trips saved on a cold migration).
                    emit({"phase": "connecting"})
                    opening = asyncio.ensure_future(self.link.open(peer))
                    ok = False
                    try:
                        claim: Claim | None = None
                        if self.ownership is not None:
                            emit({"phase": "claiming"})
                            claim = await self.ownership.claim(name, peer.public_key)
                        result = await aio.send_image(
                            opening,
                            self.key,
                            image,
                            name=name,
                            peer=peer.name,
                            level=level,
                            bwlimit=bw,
                            on_progress=progress,
                        )
                        ok = True
                    finally:
                        await self._release_channel(opening, reuse=ok)
                    if claim is not None:
                        assert self.ownership is not None
                        emit({"phase": "committing"})
                        got = await self.ownership.hand_over(claim, peer.public_key)
                        result.owner, result.epoch = got.owner, got.epoch
                finally:
                    self.stats.active_out -= 1
        except asyncio.CancelledError:
            self.stats.count_migration("out", "stopped")
            raise
        except DwcpError as exc:
            self.stats.count_migration("out", "failed")
            log.info(
                "migration of %s to %s failed: %s",
                image,
                peer.name,
                exc,
                extra={"event": "out_failed", "error": type(exc).__name__},
            )
            raise
        finally:
            self.outgoing.discard(task)
            self.migrating.discard(name)
        result.seconds = round(time.monotonic() - t0, 3)
        s = self.stats
        s.count_migration("out", "ok")
        s.bytes_sent += result.bytes_wire
        s.bytes_deduplicated += result.bytes_image - result.bytes_missing
        s.bytes_raw += result.bytes_sent
        s.bytes_compressed += result.bytes_wire
        log.info(
            "migrated %s to %s: %d bytes on the wire for %d",
            name,
            peer.name,
            result.bytes_wire,
            result.bytes_image,
            extra={
                "event": "out_ok",
                "result": result.to_dict(),
                "levels": level.history if isinstance(level, AdaptiveLevel) else [level],
            },
        )
        return result.to_dict()

    async def _release_channel(self, opening: asyncio.Future[QuicChannel], reuse: bool) -> None:
        """Give the migration's channel back, also when it ended before using it; a
        connection still being set up for a failed migration is abandoned, not awaited."""
        assert self.link is not None
        if not opening.done():
            if not reuse:
                opening.cancel()
            await asyncio.wait([opening])  # our own cancellation still propagates
        if opening.cancelled() or opening.exception() is not None:
            return  # never opened: nothing to give back
        await self.link.release(opening.result(), reuse=reuse)

    def _source_path(self, image: str) -> Path:
        """An absolute path as given, or the name of an image in this node's ``images/``."""
        if not image:
            raise UsageError("no image given")
        p = Path(image)
        if p.is_absolute() and p.exists():
            return p
        if "/" not in image:
            with contextlib.suppress(UsageError):
                stored = self.store.image_path(image)
                if stored.exists():
                    return stored
        raise ImageError(
            f"image {image} not found (a file path, or a name listed by 'dwcp images')"
        )


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
