"""Version numbers, in a leaf module so the wire and TLS layers can read them without importing
the ``dwcp`` package (whose lazy ``serve``/``connect`` import the transport: that was a cycle)."""

__version__ = "0.1.0"
#: The DWCP wire protocol version, carried in every frame header and in the ALPN.
PROTOCOL_VERSION = 3
