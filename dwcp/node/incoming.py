"""The receiving side of the node's migrations: one channel per incoming transfer.

``Incoming.on_channel`` runs ``receive_image`` on a ``dwcp-migrate/1`` channel with
the node's policy as its hooks: one task per transfer id (a newer session for it
replaces a stale one), at most ``[limits] max_transfers`` at once and their memory
within ``[limits] transfer_memory``; with consensus, no image over a VM this node
or a third node owns; an image replaces a different one only as its sender asked
(``--force``/``--backup``) or when it is provably a later copy of it.
``migrations.Migrations`` owns the lifetime (drain, cancel) and the listeners.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dwcp.delta import content_id
from dwcp.errors import ConsensusError, RemoteError, UsageError
from dwcp.identity import PublicKey
from dwcp.migrate import QuicChannel, ReceiverHooks, in_thread, receive_image
from dwcp.migrate.messages import BACKUP, FORCE, Offer
from dwcp.node.context import NodeContext
from dwcp.node.store import check_image_name
from dwcp.tasks import cancel_and_wait

if TYPE_CHECKING:
    from dwcp.transport import Channel, Session

log = logging.getLogger("dwcp.node")
CHANNEL_NAME = "dwcp-migrate/1"
MiB = 1 << 20
Report = Callable[[str, str, str, str], None]
"""``report(migration id, kind, image name, peer name)`` for an incoming migration."""


class MemoryBudget:
    """Memory the node lets incoming transfers hold together (``[limits] transfer_memory``).

    A transfer reserves what its offer says its manifest needs before anything is
    held; one that does not fit beside the running ones is refused as ``busy``
    (the source may retry), one over the whole budget as ``too_large`` (by the
    protocol, before it gets here).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> Callable[[], None]:
        if self.used + n > self.limit:
            raise RemoteError(
                "busy",
                f"the destination holds {self.used / MiB:.1f} MiB for other incoming "
                f"transfers; this one needs {n / MiB:.1f} MiB of the "
                f"{self.limit / MiB:.1f} MiB allowed ([limits] transfer_memory); retry later",
            )
        self.used += n
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.used -= n

        return release


class Incoming:
    """Receives images on incoming migration channels; ``tasks`` by transfer id."""

    def __init__(self, ctx: NodeContext, report: Report) -> None:
        self.ctx = ctx
        self.report = report
        self.tasks: dict[str, asyncio.Task[Any]] = {}  # by transfer id
        self.memory = MemoryBudget(ctx.config.limits.transfer_memory)

    async def on_channel(self, peer_key: PublicKey, session: Session, chan: Channel) -> None:
        if self.ctx.draining:
            chan.writer.close()  # the source sees the channel end: re-run when we are back
            return
        ctx = self.ctx
        peer = ctx.config.peer_by_key(peer_key.raw)
        peer_name = peer.name if peer is not None else peer_key.node_id
        hooks = ReceiverHooks(
            images_dir=ctx.store.images_dir,
            partial_dir=ctx.store.transfer_dir,
            check_name=check_image_name,
            index=ctx.index,
            max_image_bytes=ctx.config.limits.max_image_bytes,
            claim=self.claim,
            release=self.release,
            on_bytes=self.on_bytes,
            on_plan=self.on_plan,
            admit=self.admit,
            may_replace=self.may_replace,
            commit=self.commit,
            max_transfer_memory=ctx.config.limits.transfer_memory,
            reserve=self.memory.reserve,
        )
        ctx.stats.active_in += 1
        t0 = time.monotonic()
        mid = secrets.token_hex(6)
        self.report(mid, "started", "", peer_name)
        try:
            name = await receive_image(
                QuicChannel(session, chan.reader, chan.writer), peer_key, hooks
            )
        except asyncio.CancelledError:
            ctx.stats.count_migration("in", "stopped")
            self.report(mid, "stopped", "", peer_name)
            raise
        finally:
            ctx.stats.active_in -= 1
        if name is None:
            ctx.stats.count_migration("in", "failed")
            self.report(mid, "failed", "", peer_name)
            log.info("incoming migration from %s failed", peer_name, extra={"event": "in_failed"})
        else:
            ctx.stats.count_migration("in", "ok")
            self.report(mid, "ok", name, peer_name)
            log.info(
                "received image %s from %s in %.2f s",
                name,
                peer_name,
                time.monotonic() - t0,
                extra={"event": "in_ok", "image": name, "peer": peer_name},
            )

    async def admit(self, name: str, source: PublicKey) -> None:
        """With consensus, refuse an image over a VM this node owns (it may be running it)
        or for a VM that a third node owns: defence in depth, since a source that claims
        first never sends such an offer, but a source without ``[consensus]`` would."""
        own = self.ctx.ownership
        if own is None:
            return
        try:
            got = await own.owner(name)
        except ConsensusError as exc:
            raise UsageError(f"cannot check who owns VM {name}: {exc}") from None
        if got.owner == own.me:
            raise UsageError(
                f"the destination owns VM {name} (epoch {got.epoch}) and will not overwrite "
                "its disk; migrate it from the destination instead"
            )
        if got.owner and got.owner != source.node_id:
            raise UsageError(
                f"VM {name} is owned by node {got.owner} (epoch {got.epoch}), not by the "
                "sending node; migrate it from its owner"
            )

    async def commit(self, name: str, sha256: bytes, source: PublicKey, offer: Offer) -> None:
        """Record a received image: where it came from (a later version from the same
        source file may replace it) and the log line. With consensus the source commits
        the ownership move after this node's Ack (``dwcp.node.ownership``)."""
        origin = {"sender": source.node_id, "origin": offer.origin.hex(), "sha256": sha256.hex()}
        await in_thread(self.ctx.store.record_origin, name, origin)
        log.info(
            "stored image %s sha256 %s from %s",
            name,
            sha256.hex(),
            source.node_id,
            extra={"event": "commit", "image": name, "sha256": sha256.hex()},
        )

    async def may_replace(self, offer: Offer, source: PublicKey, final: bool) -> None:
        """An image replaces a different one stored under its name only if the sender
        said ``--force`` or ``--backup`` (then the old one is kept as ``NAME.~N~``), if
        the ownership cluster says the sender owns that VM (the stored copy is a stale
        copy of it), or if this node received the stored image from the same file of the
        same sender (a later version of it). Never over a symlink, a device or a FIFO."""
        store = self.ctx.store
        path = store.image_path(offer.name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(
                f"images/{offer.name} at the destination is not a regular file (a symlink, "
                "a device or a FIFO); the node never replaces one: remove or rename it there"
            )
        if offer.replace == FORCE:
            return
        held = await self.ctx.index.call(lambda ix: ix.manifest_of(path))
        if held is not None and content_id(held) == offer.content_id:
            return  # the same content: nothing is lost
        if offer.replace == BACKUP:
            if final:
                backup = store.backup_name(offer.name)
                await in_thread(os.link, path, store.images_dir / backup)
                log.info(
                    "kept the replaced image %s as %s",
                    offer.name,
                    backup,
                    extra={"event": "backup", "image": offer.name, "backup": backup},
                )
            return
        own = self.ctx.ownership
        if own is not None and (await own.owner(offer.name)).owner == source.node_id:
            return
        was = store.origin(offer.name)
        if was == {**(was or {}), "sender": source.node_id, "origin": offer.origin.hex()}:
            return
        if was is None:
            came = "was put there locally"
        elif was.get("sender") == source.node_id:
            came = "came from another file of the sending node"
        else:
            came = "came from another node"
        raise UsageError(
            f"images/{offer.name} at the destination is a different image (it {came}); "
            "nothing was changed: re-run with --force to replace it, or --backup to keep "
            f"it as {offer.name}.~N~"
        )

    async def claim(self, transfer_id: str) -> None:
        """One task per transfer id: a newer session for it replaces a stale one."""
        old = self.tasks.get(transfer_id)
        me = asyncio.current_task()
        if old is not None and old is not me and not old.done():
            await cancel_and_wait(old)
        assert me is not None
        busy = sum(1 for t in self.tasks.values() if not t.done())
        limit = self.ctx.config.limits.max_transfers
        if busy >= limit:
            raise RemoteError(
                "busy",
                f"the destination already runs {busy} incoming transfers "
                "([limits] max_transfers); retry later",
            )
        self.tasks[transfer_id] = me

    def release(self, transfer_id: str) -> None:
        if self.tasks.get(transfer_id) is asyncio.current_task():
            del self.tasks[transfer_id]

    def on_bytes(self, wire: int, raw: int) -> None:
        self.ctx.stats.bytes_received += wire

    def on_plan(self, image: int, dedup: int) -> None:
        self.ctx.stats.bytes_deduplicated += dedup
