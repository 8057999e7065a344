"""Prometheus metrics: one registry per node, filled by a collector when scraped.

The migration glue and the daemon only bump plain counters in ``NodeStats``
(no prometheus import in the hot path or in the sans-IO cores); ``NodeCollector``
turns them into metric families at scrape time, the client_python way. Live
transport figures (streams, RTT) come from a callback, so the collector never
holds a session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dwcp.version import PROTOCOL_VERSION, __version__


@dataclass
class LinkStats:
    """What one live transport session reports about itself."""

    peer: str
    streams: int
    rtt_seconds: float | None


@dataclass
class NodeStats:
    """Counters the node updates; read by ``NodeCollector`` and ``dwcp status``."""

    bytes_sent: int = 0  # payload bytes this node put on the wire (migrations)
    bytes_received: int = 0
    bytes_deduplicated: int = 0  # image bytes never sent: the destination had them
    bytes_raw: int = 0  # uncompressed bytes of the data that was sent
    bytes_compressed: int = 0  # the same data after compression
    active_in: int = 0
    active_out: int = 0
    migrations: dict[tuple[str, str], int] = field(default_factory=dict)
    links: Callable[[], list[LinkStats]] = field(default=lambda: [])
    consensus: Callable[[], dict[str, Any]] | None = None  # Ownership.status, when configured
    gossip: Callable[[], dict[str, Any]] | None = None  # GossipService.metrics, with gossip.toml

    def count_migration(self, direction: str, result: str) -> None:
        key = (direction, result)
        self.migrations[key] = self.migrations.get(key, 0) + 1

    @property
    def compression_ratio(self) -> float:
        """Raw bytes per compressed byte over all data sent (1.0 before any)."""
        return self.bytes_raw / self.bytes_compressed if self.bytes_compressed else 1.0

    def snapshot(self) -> dict[str, object]:
        """A JSON-friendly view for ``dwcp status``."""
        links = self.links()
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_deduplicated": self.bytes_deduplicated,
            "compression_ratio": round(self.compression_ratio, 3),
            "active_transfers": {"in": self.active_in, "out": self.active_out},
            "streams": sum(link.streams for link in links),
            "links": [
                {"peer": link.peer, "streams": link.streams, "rtt_seconds": link.rtt_seconds}
                for link in links
            ],
            "migrations": [
                {"direction": d, "result": r, "count": n}
                for (d, r), n in sorted(self.migrations.items())
            ],
        }


class NodeCollector(Collector):
    """Builds the node's metric families from ``NodeStats`` at scrape time."""

    def __init__(self, stats: NodeStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for name, doc, value in (
            ("dwcp_bytes_sent", "Payload bytes sent by migrations.", s.bytes_sent),
            ("dwcp_bytes_received", "Payload bytes received by migrations.", s.bytes_received),
            (
                "dwcp_bytes_deduplicated",
                "Image bytes not sent because the destination already had them.",
                s.bytes_deduplicated,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "dwcp_compression_ratio",
            "Uncompressed over compressed bytes of all data sent.",
            value=s.compression_ratio,
        )
        active = GaugeMetricFamily(
            "dwcp_active_transfers", "Migrations in progress.", labels=["direction"]
        )
        active.add_metric(["in"], s.active_in)
        active.add_metric(["out"], s.active_out)
        yield active
        links = s.links()
        yield GaugeMetricFamily(
            "dwcp_streams", "Open transport streams.", value=sum(x.streams for x in links)
        )
        rtt = GaugeMetricFamily(
            "dwcp_rtt_seconds", "Smoothed RTT of each live session.", labels=["peer"]
        )
        for link in links:
            if link.rtt_seconds is not None:
                rtt.add_metric([link.peer], link.rtt_seconds)
        yield rtt
        done = CounterMetricFamily(
            "dwcp_migrations", "Finished migrations.", labels=["direction", "result"]
        )
        for (d, r), n in sorted(s.migrations.items()):
            done.add_metric([d, r], n)
        yield done
        if s.consensus is not None:
            yield from _consensus_metrics(s.consensus())
        if s.gossip is not None:
            yield from _gossip_metrics(s.gossip())


def _gossip_metrics(g: dict[str, Any]) -> Iterator[Metric]:
    members = GaugeMetricFamily(
        "dwcp_gossip_members", "Admitted members by state in this node's view.", labels=["state"]
    )
    for state, n in sorted(g["members"].items()):
        members.add_metric([state], n)
    yield members
    events = CounterMetricFamily(
        "dwcp_gossip_events",
        "Membership protocol events (probes, accusations, suspicions, refutations, deaths...).",
        labels=["event"],
    )
    for name, n in sorted(g["counters"].items()):
        events.add_metric([name], n)
    yield events
    dropped = CounterMetricFamily(
        "dwcp_gossip_dropped", "Datagrams dropped before the protocol saw them.", labels=["reason"]
    )
    for reason, n in sorted(g["dropped"].items()):
        dropped.add_metric([reason], n)
    yield dropped
    traffic = CounterMetricFamily(
        "dwcp_gossip_bytes", "Gossip datagram bytes.", labels=["direction"]
    )
    traffic.add_metric(["sent"], g["bytes_sent"])
    traffic.add_metric(["received"], g["bytes_received"])
    yield traffic


def _consensus_metrics(c: dict[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "dwcp_consensus_replicas_connected",
        "Replicas of the ownership cluster this node's client is connected to.",
        value=c["connected"],
    )
    req = CounterMetricFamily(
        "dwcp_consensus_requests",
        "Committed ownership requests by operation and result.",
        labels=["op", "result"],
    )
    for key, n in c["requests"].items():
        req.add_metric(key.split(":", 1), n)
    yield req
    if "view" in c:
        yield GaugeMetricFamily(
            "dwcp_consensus_view", "Current PBFT view of this node's replica.", value=c["view"]
        )
        yield GaugeMetricFamily(
            "dwcp_consensus_executed",
            "Last sequence number executed by this node's replica.",
            value=c["executed"],
        )


def register_process(registry: CollectorRegistry) -> None:
    """Process (CPU, memory, fds), Python and build info, as every exporter shows them."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(BuildInfo())


class BuildInfo(Collector):
    """``dwcp_build_info{version, protocol} 1``: which dwcp a node runs."""

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "dwcp_build_info",
            "The dwcp version and DWCP protocol version of this node (always 1).",
            labels=["version", "protocol"],
        )
        info.add_metric([__version__, str(PROTOCOL_VERSION)], 1)
        yield info


def make_registry(stats: NodeStats) -> CollectorRegistry:
    """A fresh registry (not the process-global one) holding the node's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(stats))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format of ``registry``."""
    return generate_latest(registry)
