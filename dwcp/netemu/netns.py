"""Network namespaces and TUN devices through ``ip`` and ``/dev/net/tun`` (root only)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator

from dwcp.errors import EmulatorError

PREFIX = "dwcpemu"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-")


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n ns] args`` and return its stdout; raise EmulatorError on failure."""
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return run(argv, check=check)


def run(argv: list[str], check: bool = True) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EmulatorError(f"{' '.join(argv)}: {e}; install iproute2 and run as root") from e
    if check and cp.returncode != 0:
        raise EmulatorError(f"{' '.join(argv)} failed: {cp.stderr.strip() or cp.returncode}")
    return cp.stdout


def ns_exec(ns: str, argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Move the calling thread into namespace ``ns`` for the block, then back.

    Sockets made inside the block stay in ``ns`` for their whole life, so one
    process can hold both ends of a link (e.g. an asyncio server bound in b and
    a client connecting from a). Other threads are not affected.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os.close(home)
        raise EmulatorError(f"namespace {ns} is gone: {e}") from e
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise EmulatorError(f"setns({ns}): {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise EmulatorError(f"cannot return to the original namespace: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(home)


def list_ns() -> list[str]:
    out = ip("netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_ns(name: str) -> None:
    """Kill what still runs inside ``name`` (processes this run started there), then delete it."""
    pids = ip("netns", "pids", name, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    ip("netns", "delete", name, check=False)


def cleanup_stale() -> list[str]:
    """Delete emulator namespaces left behind by runs whose process is gone (e.g. SIGKILL)."""
    removed = []
    for name in list_ns():
        m = _NAME_RE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (IP packets, no packet-info header); return its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise EmulatorError(f"cannot create TUN device {name}: {e}") from e
    return fd


@functools.cache
def unavailable_reason() -> str | None:
    """Why namespaces + TUN cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "the link emulator needs root (network namespaces, TUN)"
    if shutil.which("ip") is None:
        return "the link emulator needs iproute2's `ip`"
    if not os.path.exists("/dev/net/tun"):
        return "the link emulator needs /dev/net/tun"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except EmulatorError as e:
        return f"cannot create a network namespace: {e}"
    finally:
        ip("netns", "delete", probe, check=False)
    return None


@functools.cache
def has_netem() -> bool:
    """Whether this kernel has the netem qdisc (tried in a throwaway namespace)."""
    if unavailable_reason() is not None or shutil.which("tc") is None:
        return False
    probe = f"{PREFIX}-{os.getpid()}-netem"
    try:
        ip("netns", "add", probe)
        ip("link", "set", "lo", "up", ns=probe)
        cp = subprocess.run(
            ["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return cp.returncode == 0
    except (EmulatorError, OSError, subprocess.TimeoutExpired):
        return False
    finally:
        ip("netns", "delete", probe, check=False)
