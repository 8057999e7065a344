"""``GET /metrics`` on ``[node] metrics_listen``, served by prometheus-client itself.

prometheus-client's own HTTP server (a WSGI server in one daemon thread) does the
HTTP and the content negotiation (text or OpenMetrics, gzip), so the node has no
hand-written HTTP parser. The node's figures live on the event loop, so each scrape
collects on the loop (``run_coroutine_threadsafe``, bounded) and only the rendering
happens in the server's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from dwcp.errors import ConfigError
from dwcp.node import metrics
from dwcp.node.context import NodeContext
from dwcp.node.service import BaseService

log = logging.getLogger("dwcp.node")

COLLECT_SECONDS = 5.0  # bound on one scrape waiting for the event loop
STOP_SECONDS = 5.0  # bound on the server thread finishing at stop


class OnLoop(Collector):
    """Runs ``inner.collect()`` on ``loop`` for a scrape from another thread."""

    def __init__(self, inner: Collector, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = inner
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        async def gather() -> list[Metric]:
            return list(self.inner.collect())

        fut = asyncio.run_coroutine_threadsafe(gather(), self.loop)
        try:
            got = fut.result(COLLECT_SECONDS)
        except TimeoutError:
            fut.cancel()
            log.warning("a /metrics scrape timed out waiting for the node's event loop")
            return iter(())
        return iter(got)


class MetricsEndpoint(BaseService):
    """Serves the node's registry over HTTP when ``[node] metrics_listen`` is set."""

    name = "metrics"

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        m = self.ctx.config.metrics_listen
        if m is None:
            return
        registry = CollectorRegistry(auto_describe=False)
        registry.register(OnLoop(metrics.NodeCollector(self.ctx.stats), asyncio.get_running_loop()))
        metrics.register_process(registry)
        try:
            self._server, self._thread = start_http_server(m.port, m.host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {m.host}:{m.port} (tcp): {exc.strerror or exc}; "
                "change [node] metrics_listen in node.toml"
            ) from exc

    async def stop(self) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None or thread is None:
            return
        # shutdown() blocks until serve_forever notices (its poll interval): not on the loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        await asyncio.to_thread(thread.join, STOP_SECONDS)
