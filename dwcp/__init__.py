"""dwcp: a Python implementation of DWCP v3, the Distributed WAN Communication Protocol.

Components (DWCP names in brackets):
- ``dwcp.delta``: hierarchical delta encoding (HDE), C hot path in ``dwcp._hde``;
- ``dwcp.transport``: adaptive multi-stream transport (AMST) over QUIC;
- ``dwcp.consensus``: adaptive consensus protocol (ACP), PBFT with Ed25519;
- ``dwcp.identity``: node keys; ``dwcp.errors``: typed errors;
- ``dwcp.open_connection`` / ``dwcp.start_server``: asyncio-shaped streams over a
  session (``dwcp.streams``); ``dwcp.serve`` / ``dwcp.connect``: the session API.
"""

from typing import TYPE_CHECKING

from dwcp.version import PROTOCOL_VERSION, __version__

if TYPE_CHECKING:  # the real imports are lazy (aioquic loads on first use)
    from dwcp.streams import open_connection, start_server
    from dwcp.transport import connect, serve

__all__ = [
    "PROTOCOL_VERSION",
    "__version__",
    "connect",
    "open_connection",
    "serve",
    "start_server",
]


def __getattr__(name: str) -> object:
    """The transport and stream entry points, imported on first use."""
    if name in ("serve", "connect"):
        from dwcp import transport

        return getattr(transport, name)
    if name in ("open_connection", "start_server"):
        from dwcp import streams

        return getattr(streams, name)
    raise AttributeError(f"module 'dwcp' has no attribute {name!r}")
