"""What the sans-IO consensus cores ask their driver to do, and what they report.

A core method returns a list of actions; the driver performs them in order. A
``Persist`` or ``Compact`` must be durable (fsync'd) before any later action of
the same list is performed: that ordering is how "write the vote before sending
it" is expressed without I/O in the core. Several consecutive ``Persist`` records
may share one fsync.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Persist:
    """Append ``record`` to the replica's write-ahead log (durable before later actions)."""

    record: bytes


@dataclass(frozen=True, slots=True)
class Compact:
    """Atomically replace the whole write-ahead log by ``records`` (after a stable checkpoint)."""

    records: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` to replica ``to``."""

    to: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send ``data`` to every replica except the sender itself."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Send ``data`` (a signed REPLY) to the client whose raw public key is ``client``."""

    client: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Executed:
    """A request was executed at sequence number ``seq`` (for checkers and metrics)."""

    seq: int
    view: int
    request_digest: bytes
    client: bytes
    timestamp: int
    result: bytes


@dataclass(frozen=True, slots=True)
class Committed:
    """Batch ``digest`` committed and executed at ``seq`` (empty digest list: a null request)."""

    seq: int
    view: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class ViewChanged:
    """The replica entered ``view`` (it accepted or built the NEW-VIEW)."""

    view: int
    primary: int


@dataclass(frozen=True, slots=True)
class StateTransferred:
    """The replica replaced its state by a checkpoint fetched from others at ``seq``."""

    seq: int


@dataclass(frozen=True, slots=True)
class Recovered:
    """A replica started without its log finished recovery and may vote again."""

    seq: int
    view: int


Action = (
    Persist
    | Compact
    | Send
    | Broadcast
    | ReplyTo
    | Executed
    | Committed
    | ViewChanged
    | StateTransferred
    | Recovered
)


@dataclass(frozen=True, slots=True)
class Completed:
    """f + 1 replicas sent matching signed replies: ``proof`` holds those replies' bytes."""

    timestamp: int
    op: bytes
    result: bytes
    proof: tuple[bytes, ...]


ClientEvent = Completed
