"""Blocking work of a migration (scans, zstd, pwrite, fsync, sqlite) run in threads.

A thread cannot be interrupted, so a cancelled caller waits for its thread to
end before it unwinds (``dwcp.tasks.wait_unshielded``): cleanup must not close
or delete a file a thread is still writing. The image index is owned by one
thread (``IndexWorker``) because sqlite connections are per-thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from dwcp import delta
from dwcp.errors import StorageError
from dwcp.tasks import cancel_and_wait, wait_unshielded

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, executor: Any = None) -> T:
    """Run ``fn`` in a thread; if the caller is cancelled, wait for the thread to stop first."""
    fut = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    return await wait_unshielded(fut)


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


async def iterate_in_thread(
    it: Iterator[bytes],
    depth: int = 2,
    on_item: Callable[[float, float], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Iterate a blocking generator in a thread, ``depth`` items ahead (bounded memory).

    ``on_item(busy, interval)`` is told, per item, the CPU seconds the producer
    spent making items since the last one and the time between the consumer's
    takes: how busy the producer is (see ``dwcp.pba.compression``).
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
        except Exception as exc:  # forwarded to the consumer
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
        await cancel_and_wait(task)
