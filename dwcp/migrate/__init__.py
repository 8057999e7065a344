"""Image migration between nodes: a sans-IO protocol and the asyncio glue around it.

- ``messages``: the wire messages and their codec; ``protocol``: the ``Sender`` and
  ``Receiver`` state machines and the protocol's rules (error codes, who closes);
- ``channel``: what the glue needs from a link, and the QUIC adapter (``QuicChannel``);
- ``source`` (``send_image``) and ``destination`` (``receive_image``): the glue that
  performs the machines' actions with the delta engine;
- ``threads``: blocking work in threads, the single-threaded image index.
"""

from dwcp.migrate.channel import BulkChannel, FramedChannel, MessageChannel, QuicChannel
from dwcp.migrate.destination import ReceiverHooks, Receiving, receive_image
from dwcp.migrate.results import MigrationResult, Progress
from dwcp.migrate.source import send_image
from dwcp.migrate.threads import IndexWorker, in_thread

__all__ = [
    "BulkChannel",
    "FramedChannel",
    "IndexWorker",
    "MessageChannel",
    "MigrationResult",
    "Progress",
    "QuicChannel",
    "ReceiverHooks",
    "Receiving",
    "in_thread",
    "receive_image",
    "send_image",
]
