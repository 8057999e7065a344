"""Where each replica of a cluster listens, and the JSON cluster file that says so.

Why its own module: the node daemon, the CLI and the client pool read a cluster
file without needing the replica server; it was part of ``dwcp.consensus.net``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dwcp.consensus.config import ClusterConfig
from dwcp.errors import ConfigError
from dwcp.identity import PublicKey

TUNING = (
    "checkpoint_interval",
    "watermark_window",
    "max_batch",
    "max_inflight",
    "view_change_timeout",
    "client_retry",
)
"""The ClusterConfig tuning knobs a cluster file may set."""


@dataclass(frozen=True)
class NetConfig:
    """A cluster plus where each replica listens (``addresses[i]`` is replica ``i``)."""

    cluster: ClusterConfig
    addresses: tuple[tuple[str, int], ...]
    owner_check: bool = False
    """Replicas run ``VMRegistry(check_owner=True)``: clients act only for themselves."""

    def __post_init__(self) -> None:
        if len(self.addresses) != self.cluster.n:
            raise ConfigError(
                f"{len(self.addresses)} addresses for {self.cluster.n} replicas: "
                "list one host:port per replica"
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NetConfig:
        """Read the JSON written by ``dump`` (or ``init``)."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            cluster = ClusterConfig(
                bytes.fromhex(doc["cluster_id"]),
                tuple(PublicKey.parse(t) for t in doc["replicas"]),
                tuple(PublicKey.parse(t) for t in doc["clients"]),
                **{k: v for k, v in doc.get("tuning", {}).items() if k in TUNING},
            )
            addrs = []
            for a in doc["addresses"]:
                host, _, port = str(a).rpartition(":")
                addrs.append((host, int(port)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{p}: not a valid cluster file ({type(exc).__name__}: {exc}); "
                "create one with 'python -m dwcp.consensus.net init DIR'"
            ) from exc
        owner_check = doc.get("owner_check", False)
        if type(owner_check) is not bool:
            raise ConfigError(f"{p}: owner_check: expected true or false")
        return cls(cluster, tuple(addrs), owner_check)

    def dump(self, path: str | os.PathLike[str]) -> None:
        c = self.cluster
        doc = {
            "cluster_id": c.cluster_id.hex(),
            "replicas": [k.text for k in c.replicas],
            "clients": [k.text for k in c.clients],
            "addresses": [f"{h}:{p}" for h, p in self.addresses],
            "tuning": {k: getattr(c, k) for k in TUNING},
            "owner_check": self.owner_check,
        }
        Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
