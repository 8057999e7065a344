"""A small asyncio QMP client (QEMU Machine Protocol: JSON lines over a unix socket).

Why not ``qemu.qmp`` from PyPI: it is the QEMU project's own client, but still
0.0.x with an API marked unstable, and the node needs only four things from
QMP: the greeting, ``execute`` with a deadline, the event stream, and knowing
when QEMU is gone. This client is those four, with bounded lines and bounded
event buffering; the parsing is a sans-IO class (``QmpParser``) tested alone.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Iterator
from typing import Any

from dwcp.errors import VmError

MAX_LINE = 1 << 20  # QMP replies here are small; query-migrate is < 4 KiB
MAX_EVENTS = 1024  # events kept for waiters (oldest dropped)
COMMAND_SECONDS = 10.0
CONNECT_SECONDS = 10.0


class QmpError(VmError):
    """QEMU answered a command with an error (its class and description in the message)."""


class QmpClosedError(VmError):
    """The QMP connection ended: QEMU exited or closed its monitor."""


class QmpParser:
    """Sans-IO: feed QMP lines, get replies by id and events, in order."""

    def __init__(self) -> None:
        self.greeting: dict[str, Any] | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)

    def feed_line(self, line: bytes) -> tuple[str, dict[str, Any]] | None:
        """One line from QEMU: ``("greeting"|"event"|"reply", msg)`` or None (blank)."""
        line = line.strip()
        if not line:
            return None
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise VmError(f"QEMU sent a QMP line that is not JSON: {line[:80]!r}") from exc
        if not isinstance(msg, dict):
            raise VmError(f"QEMU sent a QMP message that is not an object: {line[:80]!r}")
        if "QMP" in msg:
            self.greeting = msg
            return ("greeting", msg)
        if "event" in msg:
            self.events.append(msg)
            return ("event", msg)
        return ("reply", msg)


def reply_value(cmd: str, msg: dict[str, Any]) -> Any:
    """The ``return`` of a reply, or ``QmpError`` with QEMU's own description."""
    if "error" in msg:
        err = msg["error"]
        raise QmpError(f"QEMU refused {cmd}: {err.get('desc', err)} ({err.get('class', '?')})")
    return msg.get("return")


class QmpClient:
    """One QMP connection. ``execute`` is serialised (QMP answers in order)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.parser = QmpParser()
        self._lock = asyncio.Lock()
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._event_seen = asyncio.Condition()
        self._closed = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._id = 0

    @classmethod
    async def connect(cls, path: str, timeout: float = CONNECT_SECONDS) -> QmpClient:
        """Connect, read the greeting and leave capabilities negotiation done."""
        try:
            async with asyncio.timeout(timeout):
                r, w = await asyncio.open_unix_connection(path, limit=MAX_LINE)
                self = cls(r, w)
                kind = None
                while kind != "greeting":
                    got = self.parser.feed_line(await r.readline())
                    if got is None and r.at_eof():
                        raise QmpClosedError(f"QEMU closed its QMP socket {path} at once")
                    kind = got[0] if got else None
        except TimeoutError:
            raise VmError(f"no QMP greeting on {path} within {timeout:g} s") from None
        except OSError as exc:
            raise QmpClosedError(f"cannot connect to QMP socket {path}: {exc}") from None
        self._reader_task = asyncio.create_task(self._read_loop(), name="qmp-reader")
        await self.execute("qmp_capabilities")
        return self

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                got = self.parser.feed_line(line)
                if got is None:
                    continue
                if got[0] == "reply":
                    self._replies.put_nowait(got[1])
                else:
                    async with self._event_seen:
                        self._event_seen.notify_all()
        except (OSError, ValueError, VmError):
            pass
        finally:
            self._closed.set()
            async with self._event_seen:
                self._event_seen.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self, timeout: float) -> bool:
        """True if the connection ended (QEMU exited) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._closed.wait()
            return True
        except TimeoutError:
            return False

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float = COMMAND_SECONDS
    ) -> Any:
        """Run one command; its ``return`` value, or ``QmpError``/``QmpClosedError``."""
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        async with self._lock:
            self._id += 1
            msg["id"] = self._id
            if self.closed:
                raise QmpClosedError(f"QEMU is gone: cannot run {cmd}")
            self._writer.write(json.dumps(msg).encode() + b"\n")
            try:
                async with asyncio.timeout(timeout):
                    await self._writer.drain()
                    while True:
                        got = await self._next_reply(cmd)
                        if got.get("id") == self._id:
                            return reply_value(cmd, got)
            except TimeoutError:
                raise VmError(f"QEMU did not answer {cmd} within {timeout:g} s") from None
            except (ConnectionError, BrokenPipeError):
                raise QmpClosedError(f"QEMU is gone: cannot run {cmd}") from None

    async def _next_reply(self, cmd: str) -> dict[str, Any]:
        get = asyncio.ensure_future(self._replies.get())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        raise QmpClosedError(f"QEMU exited before answering {cmd}")

    def take_events(self, name: str | None = None) -> Iterator[dict[str, Any]]:
        """Remove and yield buffered events (those named ``name`` only, if given)."""
        keep: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        while self.parser.events:
            ev = self.parser.events.popleft()
            if name is None or ev.get("event") == name:
                yield ev
            else:
                keep.append(ev)
        self.parser.events.extendleft(reversed(keep))

    async def wait_event(
        self, name: str, timeout: float, match: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The first buffered or new event ``name`` whose data contains ``match``."""

        def find() -> dict[str, Any] | None:
            for ev in list(self.parser.events):
                data = ev.get("data") or {}
                wanted = all(data.get(k) == v for k, v in (match or {}).items())
                if ev.get("event") == name and wanted:
                    self.parser.events.remove(ev)
                    return ev
            return None

        try:
            async with asyncio.timeout(timeout):
                async with self._event_seen:
                    while (ev := find()) is None:
                        if self.closed:
                            raise QmpClosedError(f"QEMU exited while waiting for {name}")
                        await self._event_seen.wait()
                    return ev
        except TimeoutError:
            raise VmError(f"no QMP event {name} {match or ''} within {timeout:g} s") from None

    async def close(self) -> None:
        self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
