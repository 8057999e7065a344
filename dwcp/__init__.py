"""dwcp: a Python implementation of DWCP v3, the Distributed WAN Communication Protocol.

Components (DWCP names in brackets):
- ``dwcp.delta``: hierarchical delta encoding (HDE), C hot path in ``dwcp._hde``;
- ``dwcp.transport``: adaptive multi-stream transport (AMST) over QUIC;
- ``dwcp.consensus``: adaptive consensus protocol (ACP), PBFT with Ed25519;
- ``dwcp.identity``: node keys; ``dwcp.errors``: typed errors.
"""

from dwcp.version import PROTOCOL_VERSION, __version__

__all__ = ["PROTOCOL_VERSION", "__version__"]


def __getattr__(name: str) -> object:
    """``dwcp.serve`` / ``dwcp.connect``: the transport API, imported on first use."""
    if name in ("serve", "connect"):
        from dwcp import transport

        return getattr(transport, name)
    raise AttributeError(f"module 'dwcp' has no attribute {name!r}")
