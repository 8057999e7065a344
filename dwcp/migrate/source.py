"""The source side of a migration: scan, offer, stream what the destination lacks.

``Sending`` performs the ``protocol.Sender`` machine's actions (send a message,
the summary's pieces, the leaves asked for; stream ranges) and feeds their
results back; it makes no protocol decisions. Messages from the destination
are read by a pump task the whole time, also while frames stream: an error the
destination reports (a full disk, say) ends the migration at once instead of
waiting behind flow control for frames nobody reads any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from array import array
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from dwcp import delta, framing
from dwcp.delta import qcow2
from dwcp.delta.frames import raw_length
from dwcp.delta.summary import SummaryHeader, leaves_parts, summary_parts
from dwcp.errors import (
    ConnectionLostError,
    DwcpError,
    ImageError,
    IntegrityError,
    ProtocolError,
    RemoteError,
)
from dwcp.identity import NodeKey
from dwcp.migrate import messages as msg
from dwcp.migrate import protocol as proto
from dwcp.migrate.channel import BulkChannel, MessageChannel
from dwcp.migrate.results import MigrationResult, Progress
from dwcp.migrate.threads import in_thread, iterate_in_thread
from dwcp.pba.compression import AdaptiveLevel
from dwcp.pba.hostcpu import HostCpu
from dwcp.pba.zlevel import start_level
from dwcp.tasks import cancel_and_wait

log = logging.getLogger("dwcp.migrate")
QUEUE_DEPTH = 16  # messages read ahead of the machine


def trace(label: str) -> None:
    """A phase boundary, for timelines: ``dwcp-node --log-level debug`` shows them."""
    log.debug("phase %s", label, extra={"event": "phase", "phase": label})


def _choose_level_meanwhile(adapt: AdaptiveLevel, image: Path, nbytes: int) -> None:
    """Measure the image's sample at every zstd level in a worker thread while the first
    frames go out at ``adapt``'s current level, then switch to the chosen one. Waiting
    for it (a few tenths of a second of zstd) cost more than the choice saved on short
    transfers (benchmarks/RESULTS.md, issue 14). Nothing awaits the thread: it ends on
    its own, and a failed choice keeps the current level."""
    rate = adapt.predicted_bps
    assert rate is not None

    def chosen(fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            log.debug("zstd level choice failed: %r", None if fut.cancelled() else fut.exception())
            return
        choice = fut.result()
        adapt.start_at(choice.level)
        log.debug("zstd level %d (%s-bound) at %.0f bit/s", choice.level, choice.bound, rate)

    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, lambda: start_level(image, rate, nbytes=nbytes))
    fut.add_done_callback(chosen)


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def origin_of(image: Path) -> bytes:
    """Names the source file an image came from (its resolved path), 16 bytes: the
    destination lets a later version from the same file replace it."""
    h = hashlib.blake2b(digest_size=16, person=b"dwcp-origin")
    h.update(os.fsencode(image.resolve()))
    return h.digest()


def _changed(image: Path) -> str:
    return (
        f"image {image} changed while it was being sent; stop the VM or snapshot the "
        "image, then retry"
    )


class _Pacer:
    """Token-bucket style pacing of the sender to ``rate`` bytes per second."""

    def __init__(self, rate: int) -> None:
        self.rate, self.start, self.sent = rate, time.monotonic(), 0

    async def pace(self, n: int) -> None:
        self.sent += n
        if self.rate > 0:
            ahead = self.sent / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                await asyncio.sleep(ahead)


def _pairs(flat: array[int]) -> Iterator[tuple[int, int]]:
    for i in range(0, len(flat), 2):
        yield flat[i], flat[i + 1]


class Sending:
    """One outgoing migration: the glue around ``protocol.Sender``."""

    def __init__(
        self,
        key: NodeKey,
        image: Path,
        *,
        name: str,
        peer: str,
        level: int | AdaptiveLevel,
        bwlimit: int,
        on_progress: Callable[[Progress], None],
        block_size: int = delta.BLOCK_SIZE,
        replace: int = msg.REFUSE,
        dry_run: bool = False,
    ) -> None:
        self.key, self.image, self.name = key, image, name
        self.dry_run = dry_run
        self.block_size, self.replace = block_size, replace
        self.level, self.bwlimit, self.on_progress = level, bwlimit, on_progress
        self.prog = Progress(name, peer)
        self.wire = 0  # bytes this run put on the channel
        self.events: asyncio.Queue[proto.Event] = asyncio.Queue(maxsize=QUEUE_DEPTH)
        self.stop_hashing = threading.Event()
        self._streaming: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self.hashing: asyncio.Future[bytes] | None = None

    # --- scanning -------------------------------------------------------------------

    async def scan(self) -> tuple[delta.Manifest, proto.Sender]:
        image = self.image
        try:
            self.before = _stat_key(image)
        except FileNotFoundError:
            raise ImageError(f"image {image} not found") from None
        except OSError as exc:
            raise ImageError(f"cannot read image {image}: {exc.strerror}") from None
        if not image.is_file():
            raise ImageError(f"{image} is not a regular file")
        backing = qcow2.backing_file(image) or ""
        self.on_progress(self.prog)
        trace("src scan start")
        # Fingerprints first: they name the content and let the destination plan; the
        # whole-image SHA-256 (about as long again) runs while the plan and data flow.
        m = await in_thread(
            lambda: delta.scan_image(image, digest=False, block_size=self.block_size)
        )
        self.hashing = asyncio.ensure_future(
            in_thread(delta.image_sha256, image, m.stat_key, self.stop_hashing)
        )
        trace("src scan done")
        cid = delta.content_id(m)
        h = SummaryHeader.of(m)
        digest = hashlib.sha256()
        for piece in summary_parts(m):
            digest.update(piece)
        tid = proto.transfer_id_for(self.key.public.raw, self.name, cid, m.size)
        fields = (tid, self.name, m.size, m.block_size, h.nonzero_blocks, h.runs, h.entries)
        tail = (h.root, cid, digest.digest(), self.replace, origin_of(image), backing)
        unsigned = msg.Offer(*fields, *tail, bytes(64))
        offer = msg.Offer(*fields, *tail, self.key.sign(unsigned.signing_payload()))
        self.prog.bytes_image, self.prog.phase = m.size, "planning"
        self.on_progress(self.prog)
        return m, proto.Sender(offer)

    # --- channel ----------------------------------------------------------------------

    async def send(self, m: msg.Message) -> None:
        data = msg.encode(m)
        self.wire += len(data) + framing.HEADER_SIZE
        trace(f"src send {type(m).__name__} {len(data)}")
        await self.channel.send(data)
        trace(f"src sent {type(m).__name__}")

    async def pump(self) -> None:
        while True:
            try:
                m = msg.decode(await self.channel.recv())
            except ProtocolError as exc:
                await self.events.put(proto.LocalFailure("protocol", str(exc)))
                return
            except ConnectionLostError as exc:
                await self.events.put(proto.ConnectionLost(str(exc)))
                return
            trace(f"src got {type(m).__name__}")
            await self.events.put(proto.MessageReceived(m))

    async def send_pieces(self, kind: int, pieces: Iterator[bytes], tid: str) -> None:
        """Each piece as a Part, the last marked (pieces are made in a thread)."""
        it = iterate_in_thread(pieces)
        prev: bytes | None = None
        async with contextlib.aclosing(it):
            async for piece in it:
                if prev is not None:
                    await self.send(msg.Part(tid, kind, False, prev))
                prev = piece
        await self.send(msg.Part(tid, kind, True, prev or b""))

    # --- streaming --------------------------------------------------------------------

    async def stream(self, sender: proto.Sender, ranges: array[int]) -> None:
        """Send every frame of ``ranges``, then report ``StreamFinished`` (or the failure)."""
        prog = self.prog
        prog.bytes_missing = sender.stats.bytes_missing
        prog.bytes_to_send = sender.stats.bytes_pending
        prog.phase = "sending"
        self.on_progress(prog)
        trace("src stream start")
        try:
            n_frames, frame_wire = await self._frames(sender.transfer_id, ranges)
            changed = _stat_key(self.image) != self.before
        except ImageError:
            changed, n_frames, frame_wire = True, 0, 0
        except ConnectionLostError as exc:
            await self.events.put(proto.ConnectionLost(str(exc)))
            return
        trace("src stream done")
        if isinstance(self.channel, BulkChannel):
            self.wire += frame_wire
        ev: proto.Event
        if changed:
            ev = proto.LocalFailure("image_changed", _changed(self.image))
        else:
            assert self.hashing is not None
            try:
                sha = await self.hashing
            except ImageError:
                sha = b""
            if not sha:  # the image changed while it was hashed
                ev = proto.LocalFailure("image_changed", _changed(self.image))
            else:
                tid = sender.transfer_id
                dsig = self.key.sign(msg.done_signing_payload(tid, sha))
                ev = proto.StreamFinished(n_frames, frame_wire, sha, dsig)
                prog.phase = "verifying"
                self.on_progress(prog)
        await self.events.put(ev)

    async def _frames(self, tid: str, ranges: array[int]) -> tuple[int, int]:
        """Encode and send every frame; returns (frames, frame bytes).

        The image's size, mtime and inode are re-checked after every frame (>= 1 MiB),
        so a VM writing to it stops the transfer early with ``ImageError``.
        """
        pacer = _Pacer(self.bwlimit)
        count, total = 0, 0
        image, level, prog = self.image, self.level, self.prog

        async def frames() -> AsyncGenerator[bytes, None]:
            nonlocal count, total
            if isinstance(level, AdaptiveLevel):
                adapt, host = level, HostCpu()
                if adapt.predicted_bps:  # PBA: the level the predicted link and the data say
                    _choose_level_meanwhile(adapt, image, prog.bytes_to_send)

                def observe(busy: float, interval: float) -> None:
                    adapt.observe(busy, interval, host.idle_share())

                frames_ = delta.encode(image, _pairs(ranges), level=lambda: adapt.level)
                encoded = iterate_in_thread(frames_, on_item=observe)
            else:
                encoded = iterate_in_thread(delta.encode(image, _pairs(ranges), level=level))
            async with contextlib.aclosing(encoded):
                async for frame in encoded:
                    count += 1
                    total += len(frame)
                    prog.bytes_sent += raw_length(frame)
                    prog.bytes_wire += len(frame)
                    self.on_progress(prog)
                    yield frame
                    if _stat_key(image) != self.before:
                        raise ImageError(_changed(image))
                    await pacer.pace(len(frame))

        if not ranges:
            # No bulk transfer when nothing is missing: a session reused later pairs bulk
            # transfers with channels by order, so an empty one would shift that pairing.
            return count, total
        stream = frames()
        async with contextlib.aclosing(stream):
            if isinstance(self.channel, BulkChannel):
                await self.channel.send_frames(stream)
            else:
                async for frame in stream:
                    await self.send(msg.Data(tid, frame))
        return count, total

    # --- the loop -----------------------------------------------------------------------

    async def perform(
        self, m: delta.Manifest, sender: proto.Sender, a: proto.Action
    ) -> proto.Event | None:
        try:
            return await self._perform(m, sender, a)
        except ConnectionLostError as exc:
            return proto.ConnectionLost(str(exc))

    async def _perform(
        self, m: delta.Manifest, sender: proto.Sender, a: proto.Action
    ) -> proto.Event | None:
        tid = sender.transfer_id
        if isinstance(a, proto.SendMessage):
            await self.send(a.message)
        elif isinstance(a, proto.SendSummary):
            await self.send_pieces(msg.SUMMARY, summary_parts(m), tid)
        elif isinstance(a, proto.ProvideLeaves):
            trace("src leaves asked")
            await self.send_pieces(msg.LEAVES, leaves_parts(m, a.runs), tid)
            return proto.LeavesSent()
        elif isinstance(a, proto.StreamRanges):
            assert self._group is not None
            self._streaming = self._group.create_task(self.stream(sender, a.ranges))
        return None

    async def run(self, opening: MessageChannel | Awaitable[MessageChannel]) -> MigrationResult:
        t0 = time.monotonic()
        try:
            m, sender = await self.scan()
            self.channel: MessageChannel = (
                await opening if isinstance(opening, Awaitable) else opening
            )
            # The pump and the stream live as long as the exchange: one that fails on a bug
            # ends it. The outcome is raised after the group, so callers get the error
            # itself, not an ExceptionGroup.
            async with asyncio.TaskGroup() as self._group:
                self._pump = self._group.create_task(self.pump())
                try:
                    outcome = await self._exchange(m, sender, t0)
                finally:
                    for t in (self._pump, self._streaming):
                        if t is not None:
                            t.cancel()
            if isinstance(outcome, DwcpError):
                if sender.ending is proto.Ending.LINGER:
                    await _linger(self.channel)
                raise self._explain(outcome)
            return outcome
        finally:
            self._group = None
            self.stop_hashing.set()  # a failed transfer need not finish hashing
            if self.hashing is not None:
                await cancel_and_wait(self.hashing)

    async def _exchange(
        self, m: delta.Manifest, sender: proto.Sender, t0: float
    ) -> MigrationResult | DwcpError:
        actions = sender.handle(proto.Start())
        while True:
            for a in actions:
                if isinstance(a, proto.StreamRanges) and self.dry_run:
                    # The plan is known and no data has moved: stop here. The caller
                    # abandons the channel; the destination keeps nothing but an empty
                    # partial, which the real run (same transfer id) reuses.
                    trace("src dry run planned")
                    self.prog.bytes_missing = sender.stats.bytes_missing
                    self.prog.bytes_to_send = sender.stats.bytes_pending
                    return self._result(m, sender, t0)
                if isinstance(a, proto.Completed):
                    trace("src completed")
                    return self._result(m, sender, t0)
                if isinstance(a, proto.Failed):
                    return a.error
                follow = await self.perform(m, sender, a)
                if follow is not None:
                    actions.extend(sender.handle(follow))
            actions = sender.handle(await self.events.get())

    def _explain(self, err: DwcpError) -> DwcpError:
        """A peer's complaint about the data is the image changing under us, if it did."""
        if isinstance(err, IntegrityError | RemoteError):
            try:
                if _stat_key(self.image) != self.before:
                    return ImageError(_changed(self.image))
            except OSError:
                return err
        return err

    def _result(self, m: delta.Manifest, sender: proto.Sender, t0: float) -> MigrationResult:
        s = sender.stats
        return MigrationResult(
            name=self.name,
            peer=self.prog.peer,
            sha256=sender.sha256.hex(),
            bytes_image=m.size,
            bytes_missing=s.bytes_missing,
            bytes_local=s.bytes_local,
            bytes_zero=s.bytes_zero,
            bytes_sent=self.prog.bytes_sent,
            bytes_wire=self.wire,
            seconds=round(time.monotonic() - t0, 3),
            dedup_ratio=round(self.prog.dedup_ratio, 6),
            resumed=s.bytes_pending < s.bytes_missing,
            bytes_to_send=self.prog.bytes_to_send,
            dry_run=self.dry_run,
        )


async def send_image(
    opening: MessageChannel | Awaitable[MessageChannel],
    key: NodeKey,
    image: Path,
    *,
    name: str,
    peer: str,
    level: int | AdaptiveLevel = 3,
    bwlimit: int = 0,
    on_progress: Callable[[Progress], None] = lambda p: None,
    block_size: int = delta.BLOCK_SIZE,
    replace: int = msg.REFUSE,
    dry_run: bool = False,
) -> MigrationResult:
    """Migrate ``image`` over the channel ``opening`` as ``name``; returns once the peer
    acknowledged it.

    ``opening`` may be an awaitable of the channel (a connection being set up): the scan
    runs meanwhile and the channel is awaited once the offer is ready. The caller owns
    the channel either way. ``block_size`` is the manifest's (the destination accepts
    any power of two from 512 bytes to 1 MiB). ``replace`` (``messages.REFUSE``,
    ``FORCE``, ``BACKUP``) says what the destination may do with a different image
    already stored under ``name``. ``dry_run``: exchange the offer and the plan only
    and return what a real run would send (``bytes_to_send``; the channel is then
    unusable: abandon it).
    """
    s = Sending(
        key,
        image,
        name=name,
        peer=peer,
        level=level,
        bwlimit=bwlimit,
        on_progress=on_progress,
        block_size=block_size,
        replace=replace,
        dry_run=dry_run,
    )
    return await s.run(opening)


async def _linger(channel: MessageChannel) -> None:
    """We sent the final Error: read until the peer closes the channel (bounded)."""
    with contextlib.suppress(DwcpError, OSError, TimeoutError):
        async with asyncio.timeout(proto.LINGER_SECONDS):
            while True:
                await channel.recv()
