"""The node's migrations: outgoing (``migrate`` control operation) and incoming (a channel).

Outgoing: claim the VM (with ``[consensus]``), connect to the peer while the
image is scanned (a kept session is checked meanwhile, see ``sessions``), send,
then commit the ownership move. Incoming (``incoming.Incoming``): one
``Receiving`` per channel, one task per transfer id (a newer session for the same
transfer replaces a stale one), at most ``[limits] max_transfers`` at once. At
shutdown ``drain`` gives running transfers until the deadline, then cancels them:
receivers flush their journal and keep ``partial/ID`` so the same migration resumes after a restart.

Others follow migrations through ``add_listener`` (a job list, metrics): each
migration has an id and reports ``started``, ``progress`` and one of ``ok``,
``failed`` or ``stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwcp.errors import DwcpError, ImageError, UsageError
from dwcp.migrate import (
    MigrationResult,
    Progress,
    QuicChannel,
    send_image,
)
from dwcp.migrate.messages import BACKUP, FORCE, REFUSE
from dwcp.node.config import Peer, parse_rate
from dwcp.node.context import NodeContext
from dwcp.node.control import Emit, Handler
from dwcp.node.incoming import CHANNEL_NAME, Incoming
from dwcp.node.ownership import Claim
from dwcp.node.service import BaseService
from dwcp.node.store import check_image_name
from dwcp.pba.compression import MAX_LEVEL, MIN_LEVEL, AdaptiveLevel
from dwcp.pba.eta import MigrationEta
from dwcp.pba.paths import PathStore
from dwcp.tasks import TaskSet, cancel_and_wait

log = logging.getLogger("dwcp.node")
PROGRESS_INTERVAL = 0.1  # seconds between progress lines to the CLI


@dataclass
class MigrationEvent:
    """What a listener hears about one migration."""

    id: str
    direction: str  # "out" or "in"
    kind: str  # "started", "progress", "ok", "failed", "stopped"
    name: str
    peer: str
    data: dict[str, Any] = field(default_factory=dict)  # progress figures, result or error


Listener = Callable[[MigrationEvent], None]
MiB = 1 << 20


class Migrations(BaseService):
    name = "migrations"

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.outgoing: dict[str, asyncio.Task[Any]] = {}  # by migration id
        self.migrating: set[str] = set()  # names being sent: one migration per VM at a time
        self.slots = asyncio.Semaphore(ctx.config.limits.max_transfers)
        self._listeners: list[Listener] = []
        self.detached = TaskSet("detached migrations")  # migrate --detach: no CLI waits
        self.receiving = Incoming(ctx, self._tell_in)
        ctx.sessions.add_channel_handler(CHANNEL_NAME, self.receiving.on_channel)

    def handlers(self) -> Mapping[str, Handler]:
        return {"migrate": self.op_migrate}

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _tell(self, event: MigrationEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception as exc:  # a listener's bug must not fail the migration
                log.error("migration listener failed: %s", exc, exc_info=exc)

    def _tell_in(self, mid: str, kind: str, name: str, peer: str) -> None:
        self._tell(MigrationEvent(mid, "in", kind, name, peer))

    def cancel(self, migration_id: str) -> bool:
        """Stop an outgoing migration (it resumes when re-run); False if none has that id."""
        task = self.outgoing.get(migration_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    # --- lifetime ---------------------------------------------------------------------

    def _running(self) -> list[asyncio.Task[Any]]:
        return [
            t for t in (*self.receiving.tasks.values(), *self.outgoing.values()) if not t.done()
        ]

    async def drain(self, deadline: float) -> None:
        self.ctx.draining = True
        self.ctx.sessions.accepting = False  # no new sessions; running ones go on
        loop = asyncio.get_running_loop()
        if self._running():
            log.info(
                "draining %d transfer(s) for up to %.0f s",
                len(self._running()),
                max(0.0, deadline - loop.time()),
                extra={"event": "draining"},
            )
        while (pending := self._running()) and (left := deadline - loop.time()) > 0:
            await asyncio.wait(pending, timeout=min(0.1, left))
        stragglers = self._running()
        await cancel_and_wait(*stragglers)
        if stragglers:
            log.info(
                "stopped %d transfer(s); they resume when re-run",
                len(stragglers),
                extra={"event": "stopped_transfers"},
            )

    async def stop(self) -> None:
        await self.detached.aclose()  # after drain: what is left resumes when re-run

    # --- outgoing -----------------------------------------------------------------------

    async def op_migrate(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Control operation ``migrate``: {image, to, name?, bwlimit?, level?}."""
        ctx = self.ctx
        if ctx.draining:
            raise UsageError("the node is shutting down; re-run when it is back")
        await ctx.reload()
        peer = ctx.config.peer(str(args.get("to", "")))
        image = self._source_path(str(args.get("image", "")))
        name = check_image_name(str(args.get("name") or image.name))
        level: int | AdaptiveLevel
        if args.get("level"):  # an explicit --level is kept for the whole transfer
            level = int(args["level"])
            if not -7 <= level <= 19:
                raise UsageError(f"--level {level}: expected -7..19")
        else:  # adapt to whichever of the network and the CPU is the bottleneck
            start = ctx.config.limits.level
            level = AdaptiveLevel(start, lo=min(start, MIN_LEVEL), hi=max(start, MAX_LEVEL))
        try:
            limit = args.get("bwlimit")
            bw = parse_rate(limit) if limit else ctx.config.limits.bwlimit
        except ValueError as exc:
            raise UsageError(f"--bwlimit: {exc}") from None
        if args.get("force") and args.get("backup"):
            raise UsageError("--force and --backup: choose one")
        replace = FORCE if args.get("force") else BACKUP if args.get("backup") else REFUSE
        if args.get("detach"):  # runs on without the CLI; 'dwcp jobs' follows it
            if args.get("dry_run"):
                raise UsageError("--detach and --dry-run: a dry run answers at once")
            self._check_free(name)
            mid = secrets.token_hex(6)
            job = self.migrate(
                image, peer, name=name, level=level, bwlimit=bw, replace=replace, mid=mid
            )
            self.detached.spawn(self._quietly(job), name=f"migration {mid}")
            return {"id": mid, "detached": True, "name": name, "peer": peer.name}
        return await self.migrate(
            image,
            peer,
            name=name,
            level=level,
            bwlimit=bw,
            emit=emit,
            replace=replace,
            dry_run=bool(args.get("dry_run")),
        )

    @staticmethod
    async def _quietly(job: Awaitable[dict[str, Any]]) -> None:
        """A detached migration: its failure is logged and listed by ``migrate`` already."""
        with contextlib.suppress(DwcpError):  # not BaseException: cancellation propagates
            await job

    def _check_free(self, name: str) -> None:
        if name in self.migrating:
            raise UsageError(
                f"{name} is already being migrated from this node; wait for that migration "
                "(two at once could both copy it, and only one can move its ownership)"
            )

    async def migrate(
        self,
        image: Path,
        peer: Peer,
        *,
        name: str,
        level: int | AdaptiveLevel,
        bwlimit: int,
        emit: Emit = lambda d: None,
        replace: int = REFUSE,
        dry_run: bool = False,
        mid: str | None = None,
    ) -> dict[str, Any]:
        """Move ``image`` to ``peer`` as ``name``; the result once the peer stored it.

        ``dry_run``: scan, offer and plan only; the result says what a real run would
        send (``bytes_to_send``, ``bytes_zero``, ``bytes_local``) and ``predicted_seconds``
        (from the path's history, else ``bwlimit``; None when neither is known). Nothing
        is claimed, sent, stored or counted.

        ``replace`` (``messages.REFUSE``, ``FORCE``, ``BACKUP``): what the peer may do
        with a different image it already stores under ``name``.
        """
        ctx = self.ctx
        self._check_free(name)
        task = asyncio.current_task()
        assert task is not None
        mid = mid or secrets.token_hex(6)
        self.outgoing[mid] = task
        self.migrating.add(name)
        last: dict[str, Any] = {"t": 0.0, "phase": ""}
        paths: PathStore | None = getattr(ctx.sessions, "paths", None)
        hist = await asyncio.to_thread(paths.get, peer.public_key.node_id) if paths else None
        eta = MigrationEta(hist.predictor() if hist else None)  # PBA: predicted_seconds, eta_s
        if isinstance(level, AdaptiveLevel) and hist is not None and hist.seconds:
            level.predicted_bps = hist.predictor().predict(60.0).p50  # PBA: the starting level

        def say(data: dict[str, Any]) -> None:
            emit(data)
            self._tell(MigrationEvent(mid, "out", "progress", name, peer.name, data))

        def progress(p: Progress) -> None:
            now = time.monotonic()
            if p.phase == "sending" and last["phase"] != "sending":
                eta.start(now - t0, p.bytes_to_send)
            if now - last["t"] >= PROGRESS_INTERVAL or p.phase != last["phase"]:
                last["t"], last["phase"] = now, p.phase
                say(
                    {
                        "phase": p.phase,
                        "bytes_image": p.bytes_image,
                        "bytes_missing": p.bytes_missing,
                        "bytes_to_send": p.bytes_to_send,
                        "bytes_sent": p.bytes_sent,
                        "bytes_wire": p.bytes_wire,
                        "dedup_ratio": round(p.dedup_ratio, 4),
                        "eta_s": eta.remaining(
                            now - t0, p.bytes_to_send, p.bytes_sent, p.bytes_wire
                        ),
                    }
                )

        if not dry_run:
            self._tell(
                MigrationEvent(mid, "out", "started", name, peer.name, {"image": str(image)})
            )
        t0 = time.monotonic()
        try:
            async with self.slots:
                ctx.stats.active_out += 1
                try:
                    result = await self._send(
                        image, peer, name, level, bwlimit, say, progress, replace, dry_run
                    )
                finally:
                    ctx.stats.active_out -= 1
        except asyncio.CancelledError:
            ctx.stats.count_migration("out", "stopped")
            self._tell(MigrationEvent(mid, "out", "stopped", name, peer.name))
            raise
        except DwcpError as exc:
            ctx.stats.count_migration("out", "failed")
            self._tell(MigrationEvent(mid, "out", "failed", name, peer.name, {"error": str(exc)}))
            log.info(
                "migration of %s to %s failed: %s",
                image,
                peer.name,
                exc,
                extra={"event": "out_failed", "error": type(exc).__name__},
            )
            raise
        finally:
            del self.outgoing[mid]
            self.migrating.discard(name)
        result.seconds = round(time.monotonic() - t0, 3)
        if dry_run:
            plan = result.to_dict()
            plan["predicted_seconds"] = eta.start(result.seconds, result.bytes_to_send) or (
                round(result.seconds + result.bytes_to_send / bwlimit, 3) if bwlimit else None
            )
            return plan
        s = ctx.stats
        s.count_migration("out", "ok")
        s.bytes_sent += result.bytes_wire
        s.bytes_deduplicated += result.bytes_image - result.bytes_missing
        s.bytes_raw += result.bytes_sent
        s.bytes_compressed += result.bytes_wire
        out: dict[str, Any] = result.to_dict()
        out["predicted_seconds"] = eta.predicted_seconds
        if paths is not None and eta.predicted_seconds is not None:
            with contextlib.suppress(OSError):  # the history is an optimisation
                await asyncio.to_thread(
                    paths.record_transfer,
                    peer.public_key.node_id,
                    eta.predicted_seconds,
                    result.seconds,
                )
        self._tell(MigrationEvent(mid, "out", "ok", name, peer.name, out))
        log.info(
            "migrated %s to %s: %d bytes on the wire for %d",
            name,
            peer.name,
            result.bytes_wire,
            result.bytes_image,
            extra={
                "event": "out_ok",
                "result": out,
                "levels": level.history if isinstance(level, AdaptiveLevel) else [level],
            },
        )
        return out

    async def _send(
        self,
        image: Path,
        peer: Peer,
        name: str,
        level: int | AdaptiveLevel,
        bwlimit: int,
        say: Emit,
        progress: Callable[[Progress], None],
        replace: int,
        dry_run: bool = False,
    ) -> MigrationResult:
        ctx = self.ctx
        # Connect while the VM is claimed and the image scanned (~0.1 s and a handshake's
        # round trips saved on a cold migration).
        say({"phase": "connecting"})
        opening = asyncio.ensure_future(self._open(peer))
        ok = False
        try:
            claim: Claim | None = None
            if ctx.ownership is not None and not dry_run:
                say({"phase": "claiming"})
                claim = await ctx.ownership.claim(name, peer.public_key)
            result = await send_image(
                opening,
                ctx.key,
                image,
                name=name,
                peer=peer.name,
                level=level,
                bwlimit=bwlimit,
                on_progress=progress,
                replace=replace,
                dry_run=dry_run,
            )
            ok = not dry_run  # a dry run leaves its channel mid-protocol: abandoned
        finally:
            await self._give_back(opening, reuse=ok)
        if claim is not None:
            assert ctx.ownership is not None
            say({"phase": "committing"})
            got = await ctx.ownership.hand_over(claim, peer.public_key)
            result.owner, result.epoch = got.owner, got.epoch
        return result

    async def _open(self, peer: Peer) -> QuicChannel:
        sessions = self.ctx.sessions
        session = await sessions.checkout(peer)
        try:
            chan = await session.open_channel(CHANNEL_NAME)
        except BaseException:  # cancelled too: a session nobody uses must not stay open
            sessions.checkin(session, reuse=False)
            raise
        return QuicChannel(session, chan.reader, chan.writer)

    async def _give_back(self, opening: asyncio.Future[QuicChannel], reuse: bool) -> None:
        """Give the migration's session back, also when it ended before using it; a
        connection still being set up for a failed migration is abandoned, not awaited."""
        if not opening.done():
            if not reuse:
                opening.cancel()
            await asyncio.wait([opening])  # our own cancellation still propagates
        if opening.cancelled() or opening.exception() is not None:
            return  # never opened: nothing to give back
        chan = opening.result()
        keep = reuse and chan.reusable
        if keep:
            chan.end()
        else:
            chan.abandon()
        self.ctx.sessions.checkin(chan.session, reuse=keep)

    def _source_path(self, image: str) -> Path:
        """An absolute path as given, or the name of an image in this node's ``images/``."""
        if not image:
            raise UsageError("no image given")
        p = Path(image)
        if p.is_absolute() and p.exists():
            return p
        if "/" not in image:
            try:
                stored = self.ctx.store.image_path(image)
            except UsageError:
                stored = None
            if stored is not None and stored.exists():
                return stored
        raise ImageError(
            f"image {image} not found (a file path, or a name listed by 'dwcp images')"
        )
