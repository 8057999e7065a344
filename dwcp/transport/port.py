"""The small public protocol between a session and its end-points (channels, bulk ends).

End-points drive the session's sans-IO core (``SessionPort.core``) for their
protocol state and use the port only to wait and to transmit. In the other
direction the session calls each end-point's ``wake`` when something it may
be waiting for happened (data, acknowledgements, the end of the session), and
feeds channel readers with ``feed_data`` / ``feed_eof``, as asyncio's
``StreamReader``. Neither side touches the other's private members, and
neither module imports the other (``Session`` satisfies this protocol
structurally).
"""

from __future__ import annotations

from typing import Protocol

from dwcp.identity import PublicKey
from dwcp.transport.core import SessionCore


class SessionPort(Protocol):
    """What a channel or bulk end-point needs from the session it belongs to."""

    @property
    def core(self) -> SessionCore:
        """The session's protocol state; end-points call its public methods."""
        ...

    @property
    def peer(self) -> PublicKey: ...

    def check(self) -> None:
        """Raise the error that ended the session, if it has ended."""
        ...

    def flush(self) -> None:
        """Transmit (soon) whatever the core has queued on its connections."""
        ...

    async def wait_progress(self) -> None:
        """Wait until acknowledgements may have freed room (raises once the session ended)."""
        ...
