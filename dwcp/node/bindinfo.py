"""Who holds a local UDP port, for a bind error that says what to do (issue 16).

Linux only: the port's socket inodes come from ``/proc/net/udp{,6}`` and the
processes from their ``/proc/PID/fd`` links; anything unreadable (another user's
process without root) is skipped, so the answer may be "unknown".
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from dwcp.errors import ConfigError


def _inodes(port: int) -> set[str]:
    found: set[str] = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and int(cols[1].rsplit(":", 1)[1], 16) == port:
                found.add(cols[9])
    return found


def holders(port: int) -> list[str]:
    """``"PID (COMMAND)"`` of each process with a UDP socket bound to ``port``."""
    inodes = {f"socket:[{i}]" for i in _inodes(port)}
    out: list[str] = []
    if not inodes:
        return out
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                out.append(f"{pid} ({comm})")
        except OSError:
            continue
    return out


def bind_error(exc: OSError, host: str, port: int) -> ConfigError:
    """The error to raise when listening on ``host:port`` (UDP) failed with ``exc``."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        held = holders(port)
        who = f"held by process {', '.join(held)}" if held else "held by another socket"
        return ConfigError(
            f"cannot listen on {where} (udp): address already in use, {who}; stop it or "
            "change [node] listen in node.toml"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(
            f"cannot listen on {where} (udp): no local interface has that address; "
            "fix [node] listen in node.toml"
        )
    return ConfigError(f"cannot listen on {where} (udp): {exc.strerror or exc}")
