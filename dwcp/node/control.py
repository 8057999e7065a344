"""The node's local control interface: JSON lines over a unix socket.

Why a unix socket and not HTTP on 127.0.0.1: a socket file created mode 0600
in the node's private data directory can only be opened by the node's user
(and root), so the file system does the access control for free; any local
user can reach a loopback TCP port, and then every request would need a token.
It also needs no port allocation. Prometheus metrics are the exception: they
are read-only and scrapers speak HTTP, so the node serves them separately
(``[node] metrics_listen``).

Protocol: the client sends one JSON object ``{"op": ..., "args": {...}}`` and a
newline; the node answers with zero or more ``{"event": "progress", ...}`` lines
and exactly one ``{"event": "result", "data": ...}`` or
``{"event": "error", "type": ..., "message": ...}`` line. Closing the socket
cancels the request (a migration then stops, resumable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dwcp import errors
from dwcp.tasks import TaskSet, cancel_and_wait

MAX_LINE = 1 << 20
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; leave room

Emit = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Emit], Awaitable[Any]]


class NodeNotRunningError(errors.LocalError, ConnectionRefusedError):
    """No node answers on the control socket."""


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A path to ``path`` short enough for sockaddr_un (via /proc/self/fd if needed)."""
    s = str(path)
    if len(s.encode()) <= _SUN_PATH_MAX:
        yield s
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _not_a_socket(path: Path) -> errors.UsageError:
    return errors.UsageError(
        f"{path} exists and is not a socket; the node creates its control socket itself "
        "and never removes a file it did not create: set [node] control in node.toml "
        "to a path that does not exist"
    )


def bind_unix(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """Bind a listening unix socket at ``path``, mode 0600; refuse if a node already serves it.

    Only a socket nobody answers on (a node that was killed) is replaced; anything
    else at ``path`` is refused and left as it is. Returns the socket and the
    (device, inode) of the socket file, so the node removes only that file later.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise _not_a_socket(path)
        try:
            connect_unix(path).close()
        except NodeNotRunningError:
            unlink_socket(path, (st.st_dev, st.st_ino))
        else:
            raise errors.UsageError(f"a node is already running with control socket {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with _short_path(path) as p:
            sock.bind(p)
        made = os.lstat(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock, (made.st_dev, made.st_ino)


def unlink_socket(path: Path, identity: tuple[int, int]) -> None:
    """Remove ``path`` if it is still the socket file ``identity`` names (and nothing else)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == identity:
        path.unlink(missing_ok=True)


def connect_unix(path: Path, timeout: float | None = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _short_path(path) as p:
            sock.connect(p)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise NodeNotRunningError(
            f"no node is running for this config (control socket {path}); start it with "
            "'dwcp-node --config FILE'"
        ) from exc
    except OSError:
        sock.close()
        raise
    return sock


def error_line(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"event": "error", "type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, errors.RemoteError):
        out["code"] = exc.code
    return out


def error_from_line(line: dict[str, Any]) -> errors.DwcpError:
    """Rebuild a typed error from an error line (unknown types become ``DwcpError``)."""
    name, message = str(line.get("type", "")), str(line.get("message", "node error"))
    if name == "RemoteError":
        return errors.RemoteError(str(line.get("code", "io")), message)
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.DwcpError):
        with contextlib.suppress(Exception):
            return cls(message)
    return errors.DwcpError(message)


class ControlServer:
    """Serves the control socket by dispatching each request to a named handler.

    Handlers are registered by name (``add``), before or after ``start``.
    """

    def __init__(self, path: Path, handlers: Mapping[str, Handler] | None = None) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self._server: asyncio.base_events.Server | None = None
        self._made: tuple[int, int] | None = None  # the socket file this server created
        self._clients = TaskSet("control clients")

    def add(self, op: str, handler: Handler) -> None:
        """Answer control operation ``op`` with ``handler``; one handler per name."""
        if op in self.handlers:
            raise ValueError(f"control operation {op!r} already has a handler")
        self.handlers[op] = handler

    async def start(self) -> None:
        sock, self._made = bind_unix(self.path)
        self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)

    async def close(self) -> None:
        """Stop accepting, cancel requests in progress, remove the socket file."""
        if self._server is not None:
            self._server.close()
        await self._clients.aclose()
        if self._made is not None:
            unlink_socket(self.path, self._made)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio runs each client in its own task: adopt it so close() can end it.
        try:
            task = self._clients.spawn(self._serve(reader, writer), name="control request")
        except RuntimeError:  # closing: no new requests
            writer.close()
            return
        try:
            await asyncio.wait([task])
        finally:
            if not task.done():
                await cancel_and_wait(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(obj: dict[str, Any]) -> None:
            writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

        try:
            line = await reader.readline()
            req = json.loads(line)
            op, args = req["op"], req.get("args", {})
            if not isinstance(op, str) or not isinstance(args, dict):
                raise ValueError("bad request shape")
        except (ValueError, KeyError, TypeError, asyncio.LimitOverrunError):
            send(error_line(errors.UsageError("malformed control request")))
            return
        handler = self.handlers.get(op)
        if handler is None:
            send(error_line(errors.UsageError(f"unknown control operation {op!r}")))
            return

        def emit(data: dict[str, Any]) -> None:
            send({"event": "progress", "data": data})

        work = asyncio.ensure_future(handler(args, emit))
        gone = asyncio.ensure_future(reader.read(1))  # EOF: the client went away
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client hung up: stop the request
                await cancel_and_wait(work)
                return
            if work.cancelled():  # e.g. a job cancelled on the node: say so, do not hang up
                send(error_line(errors.DwcpError(f"{op} was cancelled on the node")))
                await writer.drain()
                return
            try:
                send({"event": "result", "data": work.result()})
            except errors.DwcpError as exc:
                send(error_line(exc))
            except OSError as exc:
                send(error_line(errors.StorageError(str(exc))))
            except Exception as exc:  # a bug: report it, keep the node up
                send(error_line(errors.DwcpError(f"internal error in {op}: {exc!r}")))
            await writer.drain()
        finally:
            await cancel_and_wait(gone, work)


def call(
    path: Path,
    op: str,
    args: dict[str, Any] | None = None,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = None,
) -> Any:
    """Blocking client: send one request, feed progress lines to ``on_progress``, return the
    result or raise the typed error the node reported."""
    sock = connect_unix(path)
    sock.settimeout(timeout)
    try:
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        with sock.makefile("rb") as f:
            while True:
                raw = f.readline(MAX_LINE)
                if not raw:
                    raise errors.ConnectionLostError(
                        "the node closed the control connection (did it stop?)"
                    )
                line = json.loads(raw)
                event = line.get("event")
                if event == "progress":
                    if on_progress is not None:
                        on_progress(line.get("data", {}))
                elif event == "result":
                    return line.get("data")
                else:
                    raise error_from_line(line)
    finally:
        sock.close()
