"""How ``dwcp-node`` is put together: services with a lifetime, control operations by name.

The daemon is an ordered list of services. They start in order and stop in
reverse, so each can rely on the ones before it (the image index first, the
control socket last: a socket that answers means every part is up). Shutdown
has two steps: every service is asked to ``drain`` (refuse new work, let what
runs finish until a deadline, then stop it), then to ``stop`` (release its
resources). A service may answer control requests: ``handlers`` maps operation
names to ``async (args, emit) -> result`` coroutines, collected before the
control socket opens (a name answered twice is a programming error).

To add a part to the node (gossip, VM control, a job list)::

    class Gossip(BaseService):
        name = "gossip"

        def __init__(self, ctx: NodeContext) -> None:
            self.ctx = ctx                 # config, key, store, stats, index, sessions, ...

        def handlers(self) -> Mapping[str, Handler]:
            return {"gossip": self.op_gossip}   # `dwcp` talks to it: control.call(path, "gossip")

        async def start(self) -> None: ...
        async def stop(self) -> None: ...

and add its factory to ``dwcp.node.daemon.SERVICES`` at the place its
dependencies allow. Services talk to peers through ``ctx.sessions``
(``add_channel_handler`` / ``add_request_handler``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import ClassVar, Protocol

from dwcp.node.control import Handler

log = logging.getLogger("dwcp.node")


class Service(Protocol):
    """One part of the node with a lifetime (see the module docstring)."""

    @property
    def name(self) -> str:
        """Unique among the node's services (logs and errors use it)."""
        ...

    def handlers(self) -> Mapping[str, Handler]:
        """Control operations this service answers, by name."""
        ...

    async def start(self) -> None: ...

    async def drain(self, deadline: float) -> None:
        """Refuse new work; let running work end until ``deadline`` (loop time), then stop it."""
        ...

    async def stop(self) -> None: ...

    async def reload(self) -> None:
        """The node's config was re-read (``NodeContext.config`` is the new one)."""
        ...


class BaseService:
    """A ``Service`` that does nothing: subclass it and override what you need."""

    name: ClassVar[str] = "service"

    def handlers(self) -> Mapping[str, Handler]:
        return {}

    async def start(self) -> None:
        return None

    async def drain(self, deadline: float) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def reload(self) -> None:
        return None


class ServiceSet:
    """Services started in order, drained and stopped in reverse."""

    def __init__(self) -> None:
        self._services: list[Service] = []
        self._started: list[Service] = []

    def add(self, service: Service) -> None:
        if any(s.name == service.name for s in self._services):
            raise ValueError(f"a service named {service.name!r} is already registered")
        self._services.append(service)

    def __iter__(self) -> Iterator[Service]:
        return iter(list(self._services))

    def get(self, name: str) -> Service | None:
        return next((s for s in self._services if s.name == name), None)

    def handlers(self) -> dict[str, Handler]:
        """Every service's control operations; one name answered twice raises ``ValueError``."""
        out: dict[str, Handler] = {}
        owner: dict[str, str] = {}
        for s in self._services:
            for op, h in s.handlers().items():
                if op in out:
                    raise ValueError(
                        f"control operation {op!r} is answered by both {owner[op]!r} and {s.name!r}"
                    )
                out[op], owner[op] = h, s.name
        return out

    async def start(self) -> None:
        """Start every service in order; if one fails, stop those already started, re-raise."""
        for s in self._services:
            try:
                await s.start()
            except BaseException:
                await self.stop()
                raise
            self._started.append(s)

    async def drain(self, deadline: float) -> None:
        for s in reversed(self._started):
            await s.drain(deadline)

    async def stop(self) -> None:
        """Stop the started services in reverse order; one that fails does not keep the
        others running (its error is logged)."""
        while self._started:
            s = self._started.pop()
            try:
                await s.stop()
            except Exception as exc:  # keep stopping the others; the cause is in the log
                log.error(
                    "service %s did not stop cleanly: %s",
                    s.name,
                    exc,
                    exc_info=exc,
                    extra={"event": "service_stop_failed", "service": s.name},
                )

    async def reload(self) -> None:
        for s in self._started:
            await s.reload()
