"""The source side of a migration: scan, offer, stream what the destination lacks.

``send_image`` performs the ``protocol.Sender`` machine's actions (send a
message, provide leaves, stream ranges) and feeds their results back; it makes
no protocol decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dwcp import delta, framing
from dwcp.delta.frames import raw_length
from dwcp.delta.summary import leaves_bytes, summary_bytes
from dwcp.errors import (
    ConnectionLostError,
    DwcpError,
    ImageError,
    IntegrityError,
    ManifestError,
    ProtocolError,
    RemoteError,
)
from dwcp.identity import NodeKey
from dwcp.migrate import messages as msg
from dwcp.migrate import protocol as proto
from dwcp.migrate.channel import BulkChannel, Channel
from dwcp.migrate.threads import in_thread, iterate_in_thread
from dwcp.pba.compression import AdaptiveLevel
from dwcp.pba.hostcpu import HostCpu
from dwcp.tasks import cancel_and_wait, consume

log = logging.getLogger("dwcp.migrate")


def trace(label: str) -> None:
    """A phase boundary, for timelines: ``dwcp-node --log-level debug`` shows them."""
    log.debug("phase %s", label, extra={"event": "phase", "phase": label})


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
    trace("src scan start")
    # Fingerprints first: they name the content and let the destination plan; the
    # whole-image SHA-256 (about as long again) runs while the plan and data flow.
    scanned = await in_thread(lambda: delta.scan_image(image, digest=False))
    cid = delta.content_id(scanned)
    manifest = dataclasses.replace(scanned, sha256=cid)
    stop_hashing = threading.Event()
    hashing = asyncio.ensure_future(
        in_thread(delta.image_sha256, image, scanned.stat_key, stop_hashing)
    )
    hashing.add_done_callback(consume)
    trace("src scan done")
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
            wire += len(data) + framing.HEADER_SIZE
            trace(f"src send {type(m).__name__} {len(data)}")
            await channel.send(data)
            trace(f"src sent {type(m).__name__}")

        actions = sender.handle(proto.Start())
        while True:
            for a in actions:
                if isinstance(a, proto.SendMessage):
                    await send(a.message)
                elif isinstance(a, proto.ProvideLeaves):
                    trace("src leaves asked")
                    try:
                        ev0: proto.Event = proto.LeavesReady(leaves_bytes(manifest, list(a.groups)))
                    except ManifestError as exc:
                        ev0 = proto.LocalFailure("protocol", str(exc))
                    actions = sender.handle(ev0)
                    break
                elif isinstance(a, proto.StreamRanges):
                    trace("src stream start")
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
                    trace("src stream done")
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
                    trace("src completed")
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
                    if sender.ending is proto.Ending.LINGER:
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
                    actions = sender.handle(proto.LocalFailure("protocol", str(exc)))
                    continue
                except ConnectionLostError as exc:
                    actions = sender.handle(proto.ConnectionLost(str(exc)))
                    continue
                trace(f"src got {type(m).__name__}")
                actions = sender.handle(proto.MessageReceived(m))

    finally:
        stop_hashing.set()  # a failed transfer need not finish hashing
        await cancel_and_wait(hashing)


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
            encoded = iterate_in_thread(frames_, on_item=observe)
        else:
            encoded = iterate_in_thread(delta.encode(image, list(ranges), level=level))
        async with contextlib.aclosing(encoded):
            async for frame in encoded:
                count += 1
                total += len(frame)
                prog.bytes_sent += raw_length(frame)
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


async def _linger(channel: Channel) -> None:
    """We sent the final Error: read until the peer closes the channel (bounded)."""
    with contextlib.suppress(DwcpError, OSError, TimeoutError):
        async with asyncio.timeout(proto.LINGER_SECONDS):
            while True:
                await channel.recv()
