"""What every service of a running node shares (built once the key is loaded).

Services get the ``NodeContext`` in their constructor and read ``config``
each time they need it: a reload replaces it (then every service's
``reload`` runs).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dwcp.identity import NodeKey
from dwcp.migrate.threads import IndexWorker
from dwcp.node.config import NodeConfig
from dwcp.node.metrics import NodeStats
from dwcp.node.ownership import Ownership
from dwcp.node.sessions import PeerSessions
from dwcp.node.store import Store


async def _no_reload() -> None:
    return None


@dataclass
class NodeContext:
    config: NodeConfig
    key: NodeKey
    store: Store
    stats: NodeStats
    index: IndexWorker  # the image index, owned by one thread
    sessions: PeerSessions  # QUIC: the server, warm sessions to peers
    ownership: Ownership | None  # the PBFT ownership client, with [consensus]
    started: float  # time.time() at start
    draining: bool = False  # shutting down: refuse new work
    reload: Callable[[], Awaitable[None]] = field(default=_no_reload)  # re-read the config
