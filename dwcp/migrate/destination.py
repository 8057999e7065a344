"""The destination side of a migration: plan from the local index, rebuild, verify, store.

``Receiving`` performs the ``protocol.Receiver`` machine's actions (match the
summary, assemble the manifest and plan, write a frame, finish the image, send
a message) and feeds their results back; it makes no protocol decisions.
Messages and bulk frames are read by two pump tasks into one bounded queue
(which bounds the frames held in memory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from dwcp import delta
from dwcp.delta.planner import coalesce
from dwcp.delta.summary import ManifestAssembler, need_parts, with_sha256
from dwcp.errors import ConnectionLostError, DwcpError, ProtocolError, UsageError
from dwcp.identity import PublicKey
from dwcp.migrate import messages as msg
from dwcp.migrate import protocol as proto
from dwcp.migrate.channel import BulkChannel, MessageChannel
from dwcp.migrate.threads import IndexWorker, in_thread

log = logging.getLogger("dwcp.migrate")
QUEUE_DEPTH = 8  # events (frames among them) read ahead of the writer


def trace(label: str) -> None:
    log.debug("phase %s", label, extra={"event": "phase", "phase": label})


async def _nothing(*_args: object) -> None:
    return None


@dataclass
class ReceiverHooks:
    """What the node lends a receiving transfer: where to store, the index, counters."""

    images_dir: Path
    partial_dir: Callable[[str], Path]
    check_name: Callable[[str], str]
    index: IndexWorker
    max_image_bytes: int
    claim: Callable[[str], Awaitable[None]] = _nothing
    release: Callable[[str], None] = lambda tid: None
    on_bytes: Callable[[int, int], None] = lambda wire, raw: None
    on_plan: Callable[[int, int], None] = lambda image, dedup: None
    # Before anything is planned: may this peer send an image under this name? (With
    # consensus, not over a VM this node owns, nor for a VM a third node owns.)
    admit: Callable[[str, PublicKey], Awaitable[None]] = _nothing
    # May the image replace what is stored under its name? Asked when the offer arrives
    # (final=False) and right before the rename (final=True: make a backup if asked).
    may_replace: Callable[[msg.Offer, PublicKey, bool], Awaitable[None]] = _nothing
    # Called once the image is stored and indexed, before the source gets its Ack.
    commit: Callable[[str, bytes, PublicKey, msg.Offer], Awaitable[None]] = _nothing
    # Memory: the most one incoming transfer may hold, and the node-wide budget
    # (``reserve(n)`` returns the release; it raises RemoteError("busy") when the
    # node holds too much for other transfers right now).
    max_transfer_memory: int = 1 << 62
    reserve: Callable[[int], Callable[[], None]] = lambda n: lambda: None


class Receiving:
    """One incoming migration on one channel: the glue around ``protocol.Receiver``."""

    def __init__(self, channel: MessageChannel, peer_key: PublicKey, hooks: ReceiverHooks) -> None:
        self.channel = channel
        self.peer_key = peer_key
        self.hooks = hooks
        self.receiver = proto.Receiver(
            peer_key,
            max_image_bytes=hooks.max_image_bytes,
            max_transfer_memory=hooks.max_transfer_memory,
        )
        self._unreserve: Callable[[], None] = lambda: None
        self.events: asyncio.Queue[proto.Event] = asyncio.Queue(maxsize=QUEUE_DEPTH)
        self.rebuilder: delta.Rebuilder | None = None
        self.assembler: ManifestAssembler | None = None
        self.manifest: delta.Manifest | None = None
        self.offer: msg.Offer | None = None
        self.claimed: str | None = None
        self.result: str | None = None
        self._frames: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None

    # --- pumps --------------------------------------------------------------------------

    async def pump_messages(self) -> None:
        while True:
            try:
                m = msg.decode(await self.channel.recv())
            except ProtocolError as exc:
                await self.events.put(proto.LocalFailure("protocol", str(exc)[:4000]))
                return
            except ConnectionLostError as exc:
                await self.events.put(proto.ConnectionLost(str(exc)))
                return
            await self.events.put(proto.MessageReceived(m))

    async def pump_frames(self, ch: BulkChannel) -> None:
        try:
            async for frame in ch.recv_frames():
                await self.events.put(proto.FrameReceived(frame))
        except ConnectionLostError as exc:
            await self.events.put(proto.ConnectionLost(str(exc)))
        except ProtocolError as exc:
            await self.events.put(proto.LocalFailure("protocol", str(exc)[:4000]))

    # --- actions ------------------------------------------------------------------------

    async def prepare(self, offer: msg.Offer) -> proto.Event:
        trace("dst offer")
        hooks = self.hooks
        header = proto.header_of(offer)
        try:
            hooks.check_name(offer.name)
            self._check_backing(offer)
            await hooks.admit(offer.name, self.peer_key)
            await hooks.may_replace(offer, self.peer_key, False)
            await hooks.claim(offer.transfer_id)
            self.claimed = offer.transfer_id
            self._unreserve = hooks.reserve(header.memory)
            limit, images = hooks.max_image_bytes, hooks.images_dir

            def open_assembler(ix: delta.ImageIndex) -> ManifestAssembler:
                # Images put into images/ since the last look are sources too (changed ones
                # are re-read only if the plan copies from them: fresh_plan).
                ix.sync_dir(images, changed=False)
                return ManifestAssembler(
                    header, ix.local, summary_sha256=offer.summary_sha256, max_image=limit
                )

            self.assembler = await hooks.index.call(open_assembler)
            self.offer = offer
        except (DwcpError, OSError) as exc:
            return proto.failure_for(exc)
        return proto.Admitted()

    def _check_backing(self, offer: msg.Offer) -> None:
        """A qcow2 overlay is accepted only if its backing file resolves here: a bare name
        of an image this node holds (it resolves next to the overlay, in images/)."""
        b = offer.backing
        if not b:
            return
        flatten = f"or flatten it (qemu-img convert -O qcow2 {offer.name} flat.qcow2)"
        if "/" in b or b.startswith("."):
            raise UsageError(
                f"{offer.name} is a qcow2 overlay whose backing file {b!r} would not resolve "
                f"here: rebase it onto a bare name (qemu-img rebase -u -b NAME {offer.name}) "
                f"and migrate that layer first, {flatten}"
            )
        if not (self.hooks.images_dir / b).is_file():
            raise UsageError(
                f"{offer.name} is a qcow2 overlay on {b!r}, which this node does not hold: "
                f"migrate {b} here first (dwcp migrate {b} --to ...), then the overlay, "
                f"{flatten}"
            )

    async def feed_summary(self, data: bytes, last: bool) -> proto.Event:
        asm = self.assembler
        assert asm is not None

        def feed(ix: delta.ImageIndex) -> int:
            asm.feed_summary(data)
            if last:
                asm.end_summary()
            return len(asm.needed)

        try:
            needed = await self.hooks.index.call(feed)
        except DwcpError as exc:
            return proto.failure_for(exc)
        if last:
            trace(f"dst summary matched, {needed} groups needed")
        return proto.SummaryFed(last, needed)

    async def send_need(self) -> proto.Event | None:
        asm, offer = self.assembler, self.offer
        assert asm is not None and offer is not None
        pieces = list(need_parts(asm.needed_runs()))  # 16 bytes per run of groups
        for i, piece in enumerate(pieces):
            follow = await self.send(
                msg.Part(offer.transfer_id, msg.NEED, i == len(pieces) - 1, piece)
            )
            if follow is not None:
                return follow
        return None

    async def feed_leaves(self, data: bytes, last: bool) -> proto.Event:
        asm = self.assembler
        assert asm is not None
        try:
            await self.hooks.index.call(lambda ix: asm.feed_leaves(data))
        except DwcpError as exc:
            return proto.failure_for(exc)
        return proto.LeavesFed(last)

    async def assemble(self) -> proto.Event:
        asm, offer = self.assembler, self.offer
        assert asm is not None and offer is not None
        trace("dst leaves")
        hooks = self.hooks
        try:
            m = self.manifest = await hooks.index.call(lambda ix: asm.complete())
            self.assembler = None

            def fresh_plan(ix: delta.ImageIndex) -> delta.Plan:
                # A local image the plan copies from may have changed since it was indexed
                # (a VM running from it): re-index what changed and plan again.
                p = delta.plan(m, ix.local)
                if ix.refresh(p.paths.values()):
                    p = delta.plan(m, ix.local)
                return coalesce(p, msg.MAX_RANGES)

            plan = await hooks.index.call(fresh_plan)
            out = hooks.images_dir / hooks.check_name(offer.name)
            state = hooks.partial_dir(offer.transfer_id)

            def open_rebuilder() -> delta.Rebuilder:
                rb = delta.Rebuilder.for_manifest(m, plan, out, state)
                rb.start()  # copy local extents and verify while the data arrives
                return rb

            self.rebuilder = await in_thread(open_rebuilder)
        except (DwcpError, OSError) as exc:
            return proto.failure_for(exc)
        except (KeyError, IndexError) as exc:  # a local image left the index meanwhile
            return proto.LocalFailure("io", f"the image index changed while planning ({exc!r})")
        trace("dst planned")
        hooks.on_plan(m.size, m.size - plan.bytes_missing)
        pending = tuple(self.rebuilder.pending())
        return proto.Prepared(pending, plan.bytes_missing, plan.bytes_local, plan.bytes_zero)

    async def write(self, frame: bytes) -> proto.Event:
        assert self.rebuilder is not None
        try:
            n = await in_thread(self.rebuilder.feed, frame)
        except (DwcpError, OSError) as exc:
            return proto.failure_for(exc)
        self.hooks.on_bytes(len(frame), n)
        return proto.FrameWritten(n)

    async def finish(self, sha256: bytes) -> proto.Event:
        rb, manifest, offer = self.rebuilder, self.manifest, self.offer
        assert rb is not None and manifest is not None and offer is not None
        trace("dst finish start")
        rb.sha256 = sha256  # the offer named the content; Done told its SHA-256
        stored = with_sha256(manifest, sha256)
        try:
            # Again just before the image replaces a stored one: ownership may have moved
            # here meanwhile (another migration of the same VM committed first).
            await self.hooks.admit(offer.name, self.peer_key)
            await self.hooks.may_replace(offer, self.peer_key, True)
            path = await in_thread(rb.finish)
            trace("dst finished")
            await self.hooks.index.call(lambda ix: ix.record(path, stored))  # verified
            trace("dst recorded")
            await self.hooks.commit(path.name, sha256, self.peer_key, offer)
        except (DwcpError, OSError) as exc:
            return proto.failure_for(exc)
        return proto.Finished(sha256, path.name)

    async def send(self, m: msg.Message) -> proto.Event | None:
        trace(f"dst send {type(m).__name__}")
        try:
            await self.channel.send(msg.encode(m))
        except ConnectionLostError as exc:
            return proto.ConnectionLost(str(exc))
        trace(f"dst sent {type(m).__name__}")
        return None

    async def perform(self, a: proto.Action) -> proto.Event | None:
        """Do one action; the event it produced, if any."""
        if isinstance(a, proto.SendMessage):
            return await self.send(a.message)
        if isinstance(a, proto.ExpectFrames):
            if isinstance(self.channel, BulkChannel) and self._frames is None:
                assert self._group is not None
                self._frames = self._group.create_task(self.pump_frames(self.channel))
            return None
        if isinstance(a, proto.PrepareTransfer):
            return await self.prepare(a.offer)
        if isinstance(a, proto.FeedSummary):
            return await self.feed_summary(a.data, a.last)
        if isinstance(a, proto.SendNeed):
            return await self.send_need()
        if isinstance(a, proto.FeedLeaves):
            return await self.feed_leaves(a.data, a.last)
        if isinstance(a, proto.AssembleManifest):
            return await self.assemble()
        if isinstance(a, proto.WriteFrame):
            return await self.write(a.frame)
        if isinstance(a, proto.FinishTransfer):
            return await self.finish(a.sha256)
        if isinstance(a, proto.Completed):
            self.result = a.path_name
        elif isinstance(a, proto.Failed) and self.rebuilder is not None:
            rb, self.rebuilder = self.rebuilder, None
            await in_thread(rb.abort if a.discard else rb.close)
        return None

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> str | None:
        """Serve the migration; the stored image's name, or None if it failed."""
        machine = self.receiver
        try:
            # The pumps live as long as the transfer: a pump that fails on a bug ends it.
            async with asyncio.TaskGroup() as self._group:
                messages = self._group.create_task(self.pump_messages())
                try:
                    while machine.state not in proto.TERMINAL:
                        actions = machine.handle(await self.events.get())
                        while actions:
                            follow = await self.perform(actions.pop(0))
                            if follow is not None:
                                actions.extend(machine.handle(follow))
                finally:
                    for t in (messages, self._frames):
                        if t is not None:
                            t.cancel()
            return self.result
        finally:
            self._group = None
            if self.rebuilder is not None:
                rb, self.rebuilder = self.rebuilder, None
                await in_thread(rb.close)  # keep what was received: the transfer resumes
            if self.claimed is not None:
                self.hooks.release(self.claimed)
            self._unreserve()
            if machine.ending is proto.Ending.CLOSE:
                await self.channel.close()


async def receive_image(
    channel: MessageChannel, peer_key: PublicKey, hooks: ReceiverHooks
) -> str | None:
    """Serve one incoming migration on ``channel``; returns the stored image's name or None."""
    return await Receiving(channel, peer_key, hooks).run()
