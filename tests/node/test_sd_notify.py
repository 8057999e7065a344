"""``Type=notify`` (issue 16): the node tells systemd READY=1 only once it serves, brackets
a SIGHUP reload with RELOADING=1 / READY=1, and says STOPPING=1 when it drains. The test
plays systemd: a datagram socket in NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from dwcp.node import notify
from node import cluster
from node.cluster import NodeProc


def _next(s: socket.socket) -> set[str]:
    return set(s.recv(4096).decode().split("\n"))


def test_ready_reloading_stopping_reach_the_service_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(60)
        monkeypatch.setattr(cluster, "ENV", {**cluster.ENV, "NOTIFY_SOCKET": str(path)})
        a = NodeProc(tmp_path, "a")
        a.start()
        try:
            assert a.proc is not None
            assert "READY=1" in _next(s)  # sent after the ready log, so the CLI already works
            a.proc.send_signal(signal.SIGHUP)
            got = _next(s)
            assert "RELOADING=1" in got and any(f.startswith("MONOTONIC_USEC=") for f in got)
            assert "READY=1" in _next(s)
        finally:
            assert a.stop() == 0
        assert "STOPPING=1" in _next(s)


def test_outside_systemd_notify_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/not-a-socket")
    assert notify.notify("READY=1") is False


def test_an_abstract_socket_address_works(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dwcp-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1", "STATUS=x") is True
        assert _next(s) == {"READY=1", "STATUS=x"}


def test_a_dead_service_manager_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.notify("READY=1") is False
