"""systemd's readiness protocol (``sd_notify``) for ``Type=notify`` units.

Why: with ``Type=simple`` systemd reports the node started before its ports are bound,
so ``systemctl start`` succeeds for a node that exits a moment later on a taken port,
and units ordered ``After=dwcp-node`` start too early. The protocol is one datagram
per state change to ``$NOTIFY_SOCKET`` (see sd_notify(3)); ten lines of stdlib, so no
dependency. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("dwcp.node")


def notify(*fields: str) -> bool:
    """Send ``fields`` (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=...``);
    True if a service manager was told. A failure is logged, never raised: readiness
    reporting must not stop a node that otherwise runs."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":  # an abstract socket (Linux)
        addr = "\0" + addr[1:]
    msg = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", addr, exc, extra={"event": "sd_notify"})
        return False
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the monotonic timestamp systemd 253+ expects beside it."""
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )
