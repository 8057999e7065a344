"""Asyncio glue: binds the sans-IO migration machines to a channel and the delta engine.

The glue performs the machines' actions and feeds their results back; it makes
no protocol decisions. Control messages travel on one ordered ``Channel``
(length-prefixed); data frames go over the transport's bulk path when the
channel offers one (``BulkChannel``), else as ``Data`` messages on the channel.
Blocking work (scans, zstd, pwrite, fsync) runs in threads; the image index is
owned by one thread (``IndexWorker``) because sqlite connections are per-thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import struct
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from dwcp import delta
from dwcp.delta.summary import ManifestAssembler, leaves_bytes, summary_bytes
from dwcp.errors import (
    ConnectionLostError,
    DiskFullError,
    DwcpError,
    FrameError,
    ImageError,
    IntegrityError,
    ManifestError,
    ProtocolError,
    RemoteError,
    StorageError,
    UsageError,
)
from dwcp.identity import NodeKey, PublicKey
from dwcp.migrate import messages as msg
from dwcp.migrate import protocol as proto
from dwcp.pba.compression import AdaptiveLevel
from dwcp.pba.hostcpu import HostCpu

T = TypeVar("T")
_LEN = struct.Struct("<I")
log = logging.getLogger("dwcp.migrate")


def _trace(label: str) -> None:
    """A phase boundary, for timelines: ``dwcp-node --log-level debug`` shows them."""
    log.debug("phase %s", label, extra={"event": "phase", "phase": label})


_FRAME_RAW = struct.Struct("<2sBBIII")  # dwcp.delta.frames header prefix: ... raw_len at [4]


# --- channels ------------------------------------------------------------------


class Channel(Protocol):
    """An ordered, reliable message channel between the two nodes."""

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes:
        """The next message; raises ``ConnectionLostError`` when the peer is gone."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class BulkChannel(Channel, Protocol):
    """A channel with a separate high-throughput path for data frames."""

    async def send_frames(self, frames: AsyncIterator[bytes]) -> None:
        """Send every frame, in order, over the bulk path; return when all are handed over."""
        ...

    def recv_frames(self) -> AsyncIterator[bytes]:
        """The frames the peer sends over the bulk path, in order."""
        ...


class StreamReaderLike(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class StreamWriterLike(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class FramedChannel:
    """``Channel`` over a byte stream: each message is a u32 length then its bytes."""

    def __init__(
        self, reader: StreamReaderLike, writer: StreamWriterLike, *, limit: int = msg.MAX_MESSAGE
    ) -> None:
        self.reader, self.writer, self.limit = reader, writer, limit

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(_LEN.pack(len(data)) + data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionLostError(f"cannot send to the peer: {exc}") from exc

    async def recv(self) -> bytes:
        try:
            (n,) = _LEN.unpack(await self.reader.readexactly(_LEN.size))
            if n > self.limit:
                raise ProtocolError(f"message of {n} bytes exceeds the {self.limit}-byte limit")
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionLostError("the peer closed the channel") from exc
        except (ConnectionError, OSError) as exc:
            raise ConnectionLostError(f"cannot receive from the peer: {exc}") from exc

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


# --- threads -------------------------------------------------------------------


async def in_thread(fn: Callable[..., T], *args: Any, executor: Any = None) -> T:
    """Run ``fn`` in a thread; if the caller is cancelled, wait for the thread to stop first.

    Cancelling must not leave a write in flight on a file that the caller's
    cleanup is about to close or delete.
    """
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await fut
        raise


class IndexWorker:
    """The image index, opened and used by a single thread (sqlite's rule)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dwcp-index")
        self._index: delta.ImageIndex | None = None

    async def open(self, images_dir: Path) -> None:
        def _open() -> None:
            self._index = delta.ImageIndex(self.db_path)
            self._index.sync_dir(images_dir)

        await in_thread(_open, executor=self._pool)

    async def call(self, fn: Callable[[delta.ImageIndex], T]) -> T:
        def _run() -> T:
            if self._index is None:
                raise StorageError("the image index is not open")
            return fn(self._index)

        return await in_thread(_run, executor=self._pool)

    async def close(self) -> None:
        def _close() -> None:
            if self._index is not None:
                self._index.close()
                self._index = None

        await in_thread(_close, executor=self._pool)
        self._pool.shutdown(wait=True)


# --- results and progress --------------------------------------------------------


@dataclass
class Progress:
    """What a progress bar shows; sent to the CLI while a migration runs."""

    name: str
    peer: str
    bytes_image: int = 0
    bytes_missing: int = 0  # what the destination lacked (whole image)
    bytes_to_send: int = 0  # still lacking at the start of this run (less after a resume)
    bytes_sent: int = 0  # image bytes sent so far (uncompressed)
    bytes_wire: int = 0  # bytes put on the channel so far
    phase: str = "scanning"

    @property
    def dedup_ratio(self) -> float:
        """Fraction of the image the destination did not need (zeros and local data)."""
        if not self.bytes_image:
            return 0.0
        return 1.0 - self.bytes_missing / self.bytes_image


@dataclass
class MigrationResult:
    name: str
    peer: str
    sha256: str
    bytes_image: int
    bytes_missing: int
    bytes_local: int
    bytes_zero: int
    bytes_sent: int  # image bytes sent in this run (uncompressed)
    bytes_wire: int  # bytes this run put on the channel (frames and messages)
    seconds: float
    dedup_ratio: float
    resumed: bool
    owner: str | None = None  # with consensus: the VM's owner node id after the commit
    epoch: int | None = None  # ... and its epoch (fencing token)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- sender --------------------------------------------------------------------


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _frame_raw_bytes(frame: bytes) -> int:
    return int(_FRAME_RAW.unpack_from(frame)[4]) if len(frame) >= _FRAME_RAW.size else 0


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


async def _iterate_in_thread(
    it: Iterator[bytes],
    depth: int = 2,
    on_item: Callable[[float, float], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Iterate a blocking generator in a thread, ``depth`` items ahead (bounded memory).

    ``on_item(busy, interval)`` is told, per item, the CPU seconds the producer
    spent making items since the last one and the time between the consumer's
    takes: how busy the producer is (see ``compression``).
    """
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=depth)
    busy = 0.0

    def _next() -> tuple[bytes | None, float]:
        t = time.thread_time()  # CPU, not wall: waiting for the GIL is not encoding
        item = next(it, None)
        return item, time.thread_time() - t

    async def produce() -> None:
        nonlocal busy
        try:
            while True:
                item, cpu = await in_thread(_next)
                busy += cpu
                if item is None:
                    break
                await queue.put(item)
            await queue.put(None)
        except asyncio.CancelledError:
            raise  # the consumer is gone: nobody would read the queue
        except BaseException as exc:  # forwarded to the consumer
            await queue.put(exc)

    task = asyncio.create_task(produce())
    last = time.monotonic()
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if on_item is not None:
                now = time.monotonic()
                on_item(busy, now - last)
                busy, last = 0.0, now
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def send_image(
    opening: Channel | Awaitable[Channel],
    key: NodeKey,
    image: Path,
    *,
    name: str,
    peer: str,
    level: int | AdaptiveLevel = 3,
    bwlimit: int = 0,
    on_progress: Callable[[Progress], None] = lambda p: None,
) -> MigrationResult:
    """Migrate ``image`` over the channel ``opening`` as ``name``; returns once the peer
    acknowledged it.

    ``opening`` may be an awaitable of the channel (a connection being set up): the scan
    runs meanwhile and the channel is awaited once the offer is ready. The caller owns
    the channel either way.
    """
    t0 = time.monotonic()
    prog = Progress(name, peer)
    try:
        before = _stat_key(image)
    except FileNotFoundError:
        raise ImageError(f"image {image} not found") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {image}: {exc.strerror}") from None
    if not image.is_file():
        raise ImageError(f"{image} is not a regular file")
    on_progress(prog)
    _trace("src scan start")
    # Fingerprints first: they name the content and let the destination plan; the
    # whole-image SHA-256 (about as long again) runs while the plan and data flow.
    scanned = await in_thread(lambda: delta.scan_image(image, digest=False))
    cid = delta.content_id(scanned)
    manifest = dataclasses.replace(scanned, sha256=cid)
    stop_hashing = threading.Event()
    hashing = asyncio.ensure_future(
        in_thread(delta.image_sha256, image, scanned.stat_key, stop_hashing)
    )
    hashing.add_done_callback(_consume)
    _trace("src scan done")
    summary = summary_bytes(manifest)
    tid = proto.transfer_id_for(key.public.raw, name, cid, manifest.size)
    sig = key.sign(msg.offer_signing_payload(tid, name, manifest.size, cid, summary))
    sender = proto.Sender(msg.Offer(tid, name, manifest.size, cid, summary, sig))
    prog.bytes_image, prog.phase = manifest.size, "planning"
    on_progress(prog)
    wire = 0

    try:
        channel: Channel = await opening if isinstance(opening, Awaitable) else opening

        async def send(m: msg.Message) -> None:
            nonlocal wire
            data = msg.encode(m)
            wire += len(data) + _LEN.size
            _trace(f"src send {type(m).__name__} {len(data)}")
            await channel.send(data)
            _trace(f"src sent {type(m).__name__}")

        actions = sender.handle(proto.Start())
        sent_error = False
        while True:
            for a in actions:
                if isinstance(a, proto.SendMessage):
                    await send(a.message)
                    sent_error = sent_error or isinstance(a.message, msg.Error)
                elif isinstance(a, proto.ProvideLeaves):
                    _trace("src leaves asked")
                    try:
                        ev0: proto.Event = proto.LeavesReady(leaves_bytes(manifest, list(a.groups)))
                    except ManifestError as exc:
                        ev0 = proto.LocalFailure("protocol", str(exc))
                    actions = sender.handle(ev0)
                    break
                elif isinstance(a, proto.StreamRanges):
                    _trace("src stream start")
                    prog.bytes_missing = sender.stats.bytes_missing
                    prog.bytes_to_send = sender.stats.bytes_pending
                    prog.phase = "sending"
                    on_progress(prog)
                    try:
                        n_frames, frame_wire = await _stream(
                            channel,
                            sender,
                            image,
                            before,
                            a.ranges,
                            level,
                            bwlimit,
                            prog,
                            on_progress,
                            send,
                        )
                        changed = _stat_key(image) != before
                    except ImageError:
                        changed, n_frames, frame_wire = True, 0, 0
                    _trace("src stream done")
                    if isinstance(channel, BulkChannel):
                        wire += frame_wire
                    if changed:
                        ev: proto.Event = proto.LocalFailure("image_changed", _changed(image))
                    else:
                        try:
                            sha = await hashing
                        except ImageError:
                            sha = b""
                        if not sha:
                            ev = proto.LocalFailure("image_changed", _changed(image))
                        else:
                            dsig = key.sign(msg.done_signing_payload(tid, sha))
                            ev = proto.StreamFinished(n_frames, frame_wire, sha, dsig)
                            prog.phase = "verifying"
                            on_progress(prog)
                    actions = sender.handle(ev)
                    break
                elif isinstance(a, proto.Completed):
                    _trace("src completed")
                    s = sender.stats
                    return MigrationResult(
                        name=name,
                        peer=peer,
                        sha256=sender.sha256.hex(),
                        bytes_image=manifest.size,
                        bytes_missing=s.bytes_missing,
                        bytes_local=s.bytes_local,
                        bytes_zero=s.bytes_zero,
                        bytes_sent=prog.bytes_sent,
                        bytes_wire=wire,
                        seconds=round(time.monotonic() - t0, 3),
                        dedup_ratio=round(prog.dedup_ratio, 6),
                        resumed=s.bytes_pending < s.bytes_missing,
                    )
                elif isinstance(a, proto.Failed):
                    err = a.error
                    if sent_error:
                        await _linger(channel)
                    if isinstance(err, IntegrityError | RemoteError):
                        with contextlib.suppress(OSError):
                            if _stat_key(image) != before:
                                raise ImageError(_changed(image)) from err
                    raise err
            else:
                try:
                    m = msg.decode(await channel.recv())
                except ProtocolError as exc:
                    await _best_effort(send(msg.Error(tid, "protocol", str(exc)[:4000])))
                    await _linger(channel)
                    raise
                except ConnectionLostError as exc:
                    actions = sender.handle(proto.ConnectionLost(str(exc)))
                    continue
                _trace(f"src got {type(m).__name__}")
                actions = sender.handle(proto.MessageReceived(m))

    finally:
        stop_hashing.set()  # a failed transfer need not finish hashing
        hashing.cancel()


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a background future's outcome so asyncio does not log it as lost."""
    if not fut.cancelled():
        fut.exception()


def _changed(image: Path) -> str:
    return (
        f"image {image} changed while it was being sent; stop the VM or snapshot the "
        "image, then retry"
    )


async def _stream(
    channel: Channel,
    sender: proto.Sender,
    image: Path,
    before: tuple[int, int, int],
    ranges: tuple[tuple[int, int], ...],
    level: int | AdaptiveLevel,
    bwlimit: int,
    prog: Progress,
    on_progress: Callable[[Progress], None],
    send: Callable[[msg.Message], Awaitable[None]],
) -> tuple[int, int]:
    """Encode and send every frame of ``ranges``; returns (frames, frame bytes).

    The image's size, mtime and inode are re-checked after every frame (>= 1 MiB),
    so a VM writing to it stops the transfer early with ``ImageError``.
    """
    pacer = _Pacer(bwlimit)
    count, total = 0, 0

    async def frames() -> AsyncGenerator[bytes, None]:
        nonlocal count, total
        if isinstance(level, AdaptiveLevel):
            adapt, host = level, HostCpu()

            def observe(busy: float, interval: float) -> None:
                adapt.observe(busy, interval, host.idle_share())

            frames_ = delta.encode(image, list(ranges), level=lambda: adapt.level)
            encoded = _iterate_in_thread(frames_, on_item=observe)
        else:
            encoded = _iterate_in_thread(delta.encode(image, list(ranges), level=level))
        async with contextlib.aclosing(encoded):
            async for frame in encoded:
                count += 1
                total += len(frame)
                prog.bytes_sent += _frame_raw_bytes(frame)
                prog.bytes_wire += len(frame)
                on_progress(prog)
                yield frame
                if _stat_key(image) != before:
                    raise ImageError(_changed(image))
                await pacer.pace(len(frame))

    if not ranges:
        # No bulk transfer when nothing is missing: a session reused later pairs bulk
        # transfers with channels by order, so an empty one would shift that pairing.
        return count, total
    stream = frames()
    async with contextlib.aclosing(stream):
        if isinstance(channel, BulkChannel):
            await channel.send_frames(stream)
        else:
            async for frame in stream:
                await send(msg.Data(sender.transfer_id, frame))
    return count, total


LINGER_SECONDS = 5.0


async def _linger(channel: Channel) -> None:
    """After sending a final Error, wait (bounded) for the peer to close the channel.

    Closing a QUIC session drops data still queued, so the side that sends the last
    message lets the side that receives it close; this waits for that close.
    """
    with contextlib.suppress(DwcpError, OSError, TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            while True:
                await channel.recv()


async def _best_effort(aw: Awaitable[None]) -> None:
    with contextlib.suppress(DwcpError, OSError):
        await aw


# --- receiver ------------------------------------------------------------------


@dataclass
class ReceiverHooks:
    """What the node lends a receiving transfer: where to store, the index, counters."""

    images_dir: Path
    partial_dir: Callable[[str], Path]
    check_name: Callable[[str], str]
    index: IndexWorker
    max_image_bytes: int
    claim: Callable[[str], Awaitable[None]] = lambda tid: asyncio.sleep(0)
    release: Callable[[str], None] = lambda tid: None
    on_bytes: Callable[[int, int], None] = lambda wire, raw: None
    on_plan: Callable[[int, int], None] = lambda image, dedup: None
    # Before anything is planned: may this peer send an image under this name? (With
    # consensus, not over a VM this node owns, nor for a VM a third node owns.)
    admit: Callable[[str, PublicKey], Awaitable[None]] = lambda n, k: asyncio.sleep(0)
    # Called once the image is stored and indexed, before the source gets its Ack.
    commit: Callable[[str, bytes, PublicKey], Awaitable[None]] = lambda n, h, k: asyncio.sleep(0)


def _failure_for(exc: BaseException) -> proto.LocalFailure:
    """Map a local exception to the error code sent to the peer (and whether to discard)."""
    text = str(exc)[:4000]
    if isinstance(exc, RemoteError) and exc.code in msg.ERROR_CODES:
        return proto.LocalFailure(exc.code, text)
    if isinstance(exc, DiskFullError):
        return proto.LocalFailure("disk_full", text, discard=True)
    if isinstance(exc, IntegrityError):
        return proto.LocalFailure("integrity", text, discard=True)
    if isinstance(exc, FrameError | ManifestError | ProtocolError):
        return proto.LocalFailure("protocol", text, discard=True)
    if isinstance(exc, UsageError):
        return proto.LocalFailure("refused", text)
    return proto.LocalFailure("io", text)


async def receive_image(channel: Channel, peer_key: PublicKey, hooks: ReceiverHooks) -> str | None:
    """Serve one incoming migration on ``channel``; returns the stored image's name or None."""
    receiver = proto.Receiver(peer_key, max_image_bytes=hooks.max_image_bytes)
    rebuilder: delta.Rebuilder | None = None
    claimed: str | None = None
    manifest: delta.Manifest | None = None
    frame_task: asyncio.Task[None] | None = None
    events: asyncio.Queue[proto.Event] = asyncio.Queue(maxsize=8)  # bounds frames in memory

    async def pump_messages() -> None:
        while True:
            try:
                m = msg.decode(await channel.recv())
            except ProtocolError as exc:
                await events.put(proto.LocalFailure("protocol", str(exc)[:4000], discard=False))
                return
            except ConnectionLostError as exc:
                await events.put(proto.ConnectionLost(str(exc)))
                return
            await events.put(proto.MessageReceived(m))

    async def pump_frames(ch: BulkChannel) -> None:
        try:
            async for frame in ch.recv_frames():
                await events.put(proto.FrameReceived(frame))
        except ConnectionLostError as exc:
            await events.put(proto.ConnectionLost(str(exc)))

    assembler: ManifestAssembler | None = None
    offered: msg.Offer | None = None

    async def prepare(offer: msg.Offer) -> proto.Event:
        nonlocal claimed, assembler, offered
        _trace("dst offer")
        try:
            hooks.check_name(offer.name)
            await hooks.admit(offer.name, peer_key)
            limit, images = hooks.max_image_bytes, hooks.images_dir

            def assemble_summary(ix: delta.ImageIndex) -> ManifestAssembler:
                # Images put into images/ since the last look are sources too (changed ones
                # are re-read only if the plan copies from them: fresh_plan).
                ix.sync_dir(images, changed=False)
                return ManifestAssembler(offer.summary, ix.local, max_image=limit)

            assembler = await hooks.index.call(assemble_summary)
            if assembler.size != offer.size or assembler.sha256 != offer.content_id:
                raise ManifestError("the manifest summary does not match the offer")
            await hooks.claim(offer.transfer_id)
            claimed = offer.transfer_id
            offered = offer
        except (DwcpError, OSError) as exc:
            return _failure_for(exc)
        return proto.LeavesNeeded(tuple(assembler.needed))

    async def assemble(leaves: bytes) -> proto.Event:
        nonlocal rebuilder, manifest
        assert assembler is not None and offered is not None
        asm, offer = assembler, offered
        _trace("dst leaves")
        try:
            m = manifest = await hooks.index.call(lambda ix: asm.complete(leaves))

            def fresh_plan(ix: delta.ImageIndex) -> delta.Plan:
                # A local image the plan copies from may have changed since it was indexed
                # (a VM running from it): re-index what changed and plan again.
                p = delta.plan(m, ix.local)
                if ix.refresh(p.paths.values()):
                    p = delta.plan(m, ix.local)
                return p

            plan = await hooks.index.call(fresh_plan)
            out = hooks.images_dir / hooks.check_name(offer.name)
            state = hooks.partial_dir(offer.transfer_id)

            def open_rebuilder() -> delta.Rebuilder:
                rb = delta.Rebuilder.for_manifest(m, plan, out, state)
                rb.start()  # copy local extents and verify while the data arrives
                return rb

            rebuilder = await in_thread(open_rebuilder)
        except (DwcpError, OSError) as exc:
            return _failure_for(exc)
        except (KeyError, IndexError) as exc:  # a local image left the index meanwhile
            return proto.LocalFailure("io", f"the image index changed while planning ({exc!r})")
        _trace("dst planned")
        hooks.on_plan(m.size, m.size - plan.bytes_missing)
        pending = tuple(rebuilder.pending())
        return proto.Prepared(pending, plan.bytes_missing, plan.bytes_local, plan.bytes_zero)

    async def write(frame: bytes) -> proto.Event:
        assert rebuilder is not None
        try:
            n = await in_thread(rebuilder.feed, frame)
        except (DwcpError, OSError) as exc:
            return _failure_for(exc)
        hooks.on_bytes(len(frame), n)
        return proto.FrameWritten(n)

    async def finish(sha256: bytes) -> proto.Event:
        assert rebuilder is not None and manifest is not None and offered is not None
        _trace("dst finish start")
        rebuilder.sha256 = sha256  # the offer named the content; Done told its SHA-256
        stored = dataclasses.replace(manifest, sha256=sha256)
        try:
            # Again just before the image replaces a stored one: ownership may have moved
            # here meanwhile (another migration of the same VM committed first).
            await hooks.admit(offered.name, peer_key)
            path = await in_thread(rebuilder.finish)
            _trace("dst finished")
            await hooks.index.call(lambda ix: ix.record(path, stored))  # verified: no re-scan
            _trace("dst recorded")
            await hooks.commit(path.name, sha256, peer_key)
        except (DwcpError, OSError) as exc:
            return _failure_for(exc)
        return proto.Finished(sha256, path.name)

    msg_task = asyncio.create_task(pump_messages())
    result: str | None = None
    peer_ended = False  # the peer sent the final Error: we close (see _linger)
    try:
        while receiver.state not in proto.TERMINAL:
            event = await events.get()
            peer_ended = isinstance(event, proto.MessageReceived) and isinstance(
                event.message, msg.Error
            )
            actions = receiver.handle(event)
            while actions:
                a = actions.pop(0)
                follow: proto.Event | None = None
                if isinstance(a, proto.SendMessage):
                    _trace(f"dst send {type(a.message).__name__}")
                    try:
                        await channel.send(msg.encode(a.message))
                        _trace(f"dst sent {type(a.message).__name__}")
                    except ConnectionLostError as exc:
                        follow = proto.ConnectionLost(str(exc))
                    if (
                        isinstance(a.message, msg.Plan)
                        and a.message.missing  # the source opens no bulk for nothing
                        and isinstance(channel, BulkChannel)
                        and frame_task is None
                    ):
                        frame_task = asyncio.create_task(pump_frames(channel))
                elif isinstance(a, proto.PrepareTransfer):
                    follow = await prepare(a.offer)
                elif isinstance(a, proto.AssembleManifest):
                    follow = await assemble(a.leaves)
                elif isinstance(a, proto.WriteFrame):
                    follow = await write(a.frame)
                elif isinstance(a, proto.FinishTransfer):
                    follow = await finish(a.sha256)
                elif isinstance(a, proto.Completed):
                    result = a.path_name
                elif isinstance(a, proto.Failed) and rebuilder is not None:
                    await in_thread(rebuilder.abort if a.discard else rebuilder.close)
                    rebuilder = None
                if follow is not None:
                    actions.extend(receiver.handle(follow))
        return result
    finally:
        for t in (msg_task, frame_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        if rebuilder is not None and receiver.state is not proto.State.COMPLETE:
            await in_thread(rebuilder.close)
        if claimed is not None:
            hooks.release(claimed)
        if peer_ended:
            await channel.close()
