"""Plan one migration of a large sparse image in memory and report the peak RSS.

    python tests/node/planprobe.py SIZE BLOCK_SIZE DATA_BYTES WORKDIR

The source scans the image (``DATA_BYTES`` of random data in 16 islands, the
rest a hole) with ``BLOCK_SIZE``-byte blocks and offers it; the destination
matches the summary, assembles the manifest and plans. Once the source has the
plan (it starts sending), both stop. Prints one JSON object: the process's
VmHWM before and after (KiB) and the plan's figures. Run as a fresh process so
the peak is this migration's alone (``tests/node/test_large.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from dwcp import migrate
from dwcp.errors import ConnectionLostError
from dwcp.identity import NodeKey
from dwcp.node.store import Store, check_image_name
from dwcp.tasks import cancel_and_wait


def vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


class Mem:
    """One end of an in-memory channel pair with a bulk path."""

    def __init__(self, inbox: asyncio.Queue[bytes | None], outbox: asyncio.Queue[bytes | None]):
        self.inbox, self.outbox = inbox, outbox
        self.bin: asyncio.Queue[bytes | None] = asyncio.Queue(4)
        self.bout: asyncio.Queue[bytes | None] = asyncio.Queue(4)

    async def send(self, data: bytes) -> None:
        await self.outbox.put(data)

    async def recv(self) -> bytes:
        data = await self.inbox.get()
        if data is None:
            raise ConnectionLostError("closed")
        return data

    async def close(self) -> None:
        await self.outbox.put(None)

    async def send_frames(self, frames: AsyncIterator[bytes]) -> None:
        async for f in frames:
            await self.bout.put(f)

    async def recv_frames(self) -> AsyncIterator[bytes]:
        while (f := await self.bin.get()) is not None:
            yield f


def make_sparse(path: Path, size: int, data: int) -> None:
    rng = random.Random(1)
    with open(path, "wb") as f:
        f.truncate(size)
        if data:
            island = data // 16
            for k in range(16):
                f.seek(k * (size // 16) + 12345 * 4096)
                f.write(rng.randbytes(island))


async def main(size: int, block_size: int, data: int, work: Path) -> dict[str, object]:
    image = work / "big.img"
    make_sparse(image, size, data)
    store = Store(work / "dest")
    store.create()
    index = migrate.IndexWorker(store.index_path)
    await index.open(store.images_dir)
    hooks = migrate.ReceiverHooks(
        images_dir=store.images_dir,
        partial_dir=store.transfer_dir,
        check_name=check_image_name,
        index=index,
        max_image_bytes=1 << 50,
        max_transfer_memory=256 << 20,
    )
    a2b: asyncio.Queue[bytes | None] = asyncio.Queue(8)
    b2a: asyncio.Queue[bytes | None] = asyncio.Queue(8)
    src, dst = Mem(b2a, a2b), Mem(a2b, b2a)
    dst.bin = src.bout
    key = NodeKey.generate()
    planned = asyncio.Event()
    seen: dict[str, object] = {}

    def progress(p: migrate.Progress) -> None:
        if p.phase == "sending" and not planned.is_set():
            seen.update(bytes_image=p.bytes_image, bytes_missing=p.bytes_missing)
            planned.set()

    before = vm_hwm_kib()
    send = asyncio.create_task(
        migrate.send_image(
            src, key, image, name="big.img", peer="b", on_progress=progress, block_size=block_size
        )
    )
    recv = asyncio.create_task(migrate.receive_image(dst, key.public, hooks))
    waiter = asyncio.create_task(planned.wait())
    await asyncio.wait([send, recv, waiter], return_when=asyncio.FIRST_COMPLETED)
    failed = [repr(t.exception()) for t in (send, recv) if t.done() and t.exception()]
    await cancel_and_wait(send, recv, waiter)
    await index.close()
    after = vm_hwm_kib()
    return {"vm_hwm_before_kib": before, "vm_hwm_after_kib": after, "failed": failed, **seen}


if __name__ == "__main__":
    size, bs, data = (int(x) for x in sys.argv[1:4])
    out = asyncio.run(main(size, bs, data, Path(sys.argv[4])))
    print(json.dumps(out))
    os._exit(0)  # do not wait for the threads of a cancelled hash pass
