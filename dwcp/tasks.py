"""One task discipline for dwcp's asyncio layers.

The rules (trio's, applied to asyncio): a task never outlives the scope that
started it (``asyncio.TaskGroup`` where tasks share a lifetime, ``TaskSet``
where they come and go, as a server's per-client tasks); a background task's
outcome is always retrieved (asyncio otherwise logs "exception was never
retrieved"); and cancelling other tasks never swallows the *caller's* own
cancellation. Suppressing every exception (``BaseException``) around an ``await`` breaks
that last rule: if the caller is cancelled while it waits for a child to
finish, the ``CancelledError`` meant for the caller is eaten and the caller
keeps running. ``cancel_and_wait`` is the replacement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("dwcp.tasks")


def consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a finished future's outcome so asyncio does not report it as lost.

    Use as a done-callback for a task whose failure is reported elsewhere.
    """
    if not fut.cancelled():
        fut.exception()


def log_failure(fut: asyncio.Future[Any]) -> None:
    """Done-callback: log a background task's unexpected failure (and retrieve it)."""
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.error("background task %r failed: %s", fut, exc, exc_info=exc)


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until every one has finished.

    The tasks' own outcomes (their ``CancelledError`` or any exception they
    raised while unwinding) are retrieved and dropped: the caller asked for them
    to stop. If the *caller* is cancelled while waiting, the tasks are still
    awaited to the end, then the caller's ``CancelledError`` is re-raised.
    """
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    cancelled_here = False
    while pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled_here = True  # keep waiting: children must not outlive us
        pending = [t for t in pending if not t.done()]
    for t in tasks:
        if t.done():
            consume(t)
    if cancelled_here:
        raise asyncio.CancelledError


async def wait_unshielded(fut: asyncio.Future[T]) -> T:
    """Await ``fut`` (e.g. an executor job that cannot be interrupted) to its end.

    If the caller is cancelled meanwhile, the wait continues until ``fut`` is
    done (a thread cannot be stopped, and its result may hold resources), then
    the caller's ``CancelledError`` is re-raised.
    """
    cancelled_here = False
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            cancelled_here = True
    if cancelled_here:
        consume(fut)
        raise asyncio.CancelledError
    return fut.result()


class TaskSet:
    """Tasks that come and go within one owner's lifetime (a server's clients).

    ``spawn`` starts a task and forgets it when it ends (its outcome retrieved,
    failures logged); ``aclose`` cancels whatever is left and waits for it,
    re-raising the caller's own cancellation.
    """

    def __init__(self, name: str = "tasks") -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self._name} is closed; no new tasks")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        log_failure(task)

    async def aclose(self) -> None:
        self._closed = True
        await cancel_and_wait(*self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(set(self._tasks))
