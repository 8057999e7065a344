"""Typed errors for dwcp.

Two families, as in h11: ``LocalError`` means the caller misused the API or
gave bad input (fix the call); ``PeerError`` means the remote side broke the
protocol (the node blames the peer, closes that stream or session, and keeps
running). Every error also subclasses the closest builtin so generic handlers
(``except ValueError``, ``except OSError``) still work. Messages should say
what to do next, not only what went wrong.
"""

from __future__ import annotations


class DwcpError(Exception):
    """Base of every error raised on purpose by dwcp."""


# --- caller / local side -------------------------------------------------


class LocalError(DwcpError):
    """The caller, its arguments or its local files are at fault."""


class ConfigError(LocalError, ValueError):
    """A configuration file or option is invalid; the message names file, key and expectation."""


class UsageError(LocalError, ValueError):
    """An API or command was called with arguments that cannot work."""


class KeyFileError(LocalError, ValueError):
    """A key file is missing, unreadable, has unsafe permissions or the wrong format."""


class ImageError(LocalError, OSError):
    """An image file is missing, unreadable, or changed while it was being read."""


class LocalImageChangedError(ImageError):
    """A local image used as a source changed since it was indexed; re-plan and resume."""


class BaseImageError(LocalError, ValueError):
    """The base image(s) given do not hold the data a delta was made against."""


class StorageError(LocalError, OSError):
    """Writing to the local disk failed (the partial output has been removed)."""


class DiskFullError(StorageError):
    """The destination file system has no room left (ENOSPC/EDQUOT)."""


class EmulatorError(LocalError, OSError):
    """The link emulator could not build or run its namespaces (needs root, netns and TUN)."""


# --- remote / data side --------------------------------------------------


class PeerError(DwcpError):
    """Data that came from outside (network or a file made elsewhere) is invalid."""


class ProtocolError(PeerError, ValueError):
    """A frame or message is malformed, too large, or not allowed in this state."""


class FrameError(ProtocolError):
    """A wire or delta frame failed to decode (bad magic, length, checksum or size limit)."""


class ManifestError(ProtocolError):
    """An image manifest failed to decode or is internally inconsistent."""


class IntegrityError(PeerError, ValueError):
    """Reassembled data does not match its fingerprint or the whole-image digest."""


class RemoteError(PeerError, RuntimeError):
    """The peer could not do what was asked (disk full, busy, refused); ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AuthenticationError(PeerError, PermissionError):
    """A peer's key is not trusted, or a signature does not verify."""


# --- transport -----------------------------------------------------------


class TransportError(DwcpError, ConnectionError):
    """A session could not be established or was lost; the caller may reconnect and resume."""


class ConnectionLostError(TransportError):
    """The peer closed the connection or the network dropped it."""


class IdleTimeoutError(TransportError):
    """The peer stopped answering for longer than the idle timeout."""


class SessionClosedError(TransportError):
    """The session was closed locally; open a new one to continue."""


# --- consensus -----------------------------------------------------------


class ConsensusError(DwcpError):
    """A consensus operation failed or could not reach a quorum in time."""


class WalError(ConsensusError, OSError):
    """A replica's write-ahead log is missing, corrupt or does not match its identity."""


class VmError(LocalError, RuntimeError):
    """A VM could not be defined, started, stopped or migrated here (QEMU missing, bad
    definition, QEMU refused a command); the message says what to do."""


class MigrationAbortedError(VmError):
    """A live migration gave up cleanly (the guest did not converge in its budget): the VM
    keeps running at the source, ownership unchanged; the message says what to try."""
