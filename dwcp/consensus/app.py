"""The interface between PBFT and the replicated application."""

from __future__ import annotations

from typing import Protocol


class StateMachine(Protocol):
    """A deterministic application replicated by PBFT.

    Every replica executes the same operations in the same order, so ``execute``
    must depend only on the state and ``op`` and return canonical bytes (the
    client compares the results of f + 1 replicas byte for byte), and
    ``snapshot`` must be canonical too (its hash is the checkpoint digest).
    """

    def execute(self, op: bytes, client: bytes = b"") -> bytes:
        """Apply ``op`` (any bytes a client sent, possibly malformed) and return the result.

        ``client`` is the raw public key that signed the request, for access control
        (the same on every replica, so still deterministic).
        """
        ...

    def snapshot(self) -> bytes:
        """Return the whole state in canonical form."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the state by a ``snapshot()`` (raise ``ProtocolError`` if it is invalid)."""
        ...

    def digest(self) -> bytes:
        """Return a short hash of the state (for checkers; equal states give equal digests)."""
        ...
