"""The control socket: dispatch, typed errors, progress lines, cancellation on hang-up."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dwcp.errors import ImageError, RemoteError, UsageError
from dwcp.node import control
from dwcp.node.store import Store


def run_server(path: Path, handlers: dict[str, control.Handler], client: Any) -> Any:
    """Start a ControlServer, run the blocking ``client`` in a thread, stop the server."""

    async def main() -> Any:
        server = control.ControlServer(path, handlers)
        await server.start()
        try:
            return await asyncio.to_thread(client)
        finally:
            await server.close()

    return asyncio.run(main())


def test_result_progress_and_errors(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"

    async def echo(args: dict[str, Any], emit: control.Emit) -> Any:
        emit({"step": 1})
        emit({"step": 2})
        return {"got": args}

    async def fail(args: dict[str, Any], emit: control.Emit) -> Any:
        raise ImageError("image x not found")

    async def remote(args: dict[str, Any], emit: control.Emit) -> Any:
        raise RemoteError("disk_full", "no space at the destination")

    def client() -> None:
        seen: list[dict[str, Any]] = []
        assert control.call(sock, "echo", {"a": 1}, on_progress=seen.append) == {"got": {"a": 1}}
        assert seen == [{"step": 1}, {"step": 2}]
        with pytest.raises(ImageError, match="not found"):
            control.call(sock, "fail")
        with pytest.raises(RemoteError) as info:
            control.call(sock, "remote")
        assert info.value.code == "disk_full"
        with pytest.raises(UsageError, match="unknown control operation"):
            control.call(sock, "nope")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as s:  # garbage gets an error line, not a crash
            s.connect(str(sock))
            s.sendall(b"{not json\n")
            line = json.loads(s.makefile().readline())
            assert line["event"] == "error" and line["type"] == "UsageError"

    run_server(sock, {"echo": echo, "fail": fail, "remote": remote}, client)
    assert not sock.exists()


def test_hang_up_cancels_the_request(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    state: dict[str, bool] = {"started": False, "cancelled": False}

    async def slow(args: dict[str, Any], emit: control.Emit) -> Any:
        state["started"] = True
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    def client() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b'{"op": "slow"}\n')
            for _ in range(400):
                if state["started"]:
                    break
                time.sleep(0.01)
        for _ in range(400):
            if state["cancelled"]:
                return
            time.sleep(0.01)

    run_server(sock, {"slow": slow}, client)
    assert state["cancelled"]


def test_long_socket_path_and_not_running(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    sock = deep / "control.sock"

    async def ping(args: dict[str, Any], emit: control.Emit) -> Any:
        return "pong"

    assert run_server(sock, {"ping": ping}, lambda: control.call(sock, "ping")) == "pong"
    with pytest.raises(control.NodeNotRunningError, match="dwcp-node"):
        control.call(sock, "ping")


def test_second_node_on_same_socket_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"

    def client() -> None:
        with pytest.raises(UsageError, match="already running"):
            control.bind_unix(sock)

    run_server(sock, {}, client)


def test_stale_partial_transfers_are_dropped(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.create()
    old, new = "a" * 32, "b" * 32
    for tid in (old, new):
        store.transfer_dir(tid).mkdir()
        (store.transfer_dir(tid) / "journal").write_bytes(b"")
    past = time.time() - 10 * 86400
    for p in (store.transfer_dir(old), store.transfer_dir(old) / "journal"):
        os.utime(p, (past, past))
    assert store.drop_stale_transfers(7 * 86400, time.time()) == [old]
    assert store.partial_transfers() == [new]


def test_a_control_path_naming_an_existing_file_is_refused_and_the_file_kept(
    tmp_path: Path,
) -> None:
    """At 9038843 ``control = "notes.txt"`` in node.toml deleted notes.txt at start."""
    from node.cluster import ENV, PY, NodeProc

    n = NodeProc(tmp_path, "n")
    notes = n.dir / "notes.txt"
    notes.write_text("my notes\n")
    text = n.config.read_text().replace('# control = "data/control.sock"', 'control = "notes.txt"')
    n.config.write_text(text)
    proc = subprocess.Popen(
        [PY, "-m", "dwcp.node", "--config", str(n.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        _, err = proc.communicate(timeout=60)  # at 9038843 the node started and ran
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    assert "notes.txt" in err and "not a socket" in err, err
    assert notes.read_text() == "my notes\n"


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_bind_never_removes_what_is_not_a_socket(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "c.sock"
    target = tmp_path / "target"
    if kind == "file":
        path.write_text("x")
    elif kind == "dir":
        path.mkdir()
    else:
        target.write_text("y")
        path.symlink_to(target)
    with pytest.raises(UsageError, match="not a socket"):
        control.bind_unix(path)
    assert path.exists() or path.is_symlink()
    if kind == "symlink":
        assert target.read_text() == "y" and path.is_symlink()


def test_a_stale_socket_is_replaced_and_removed_at_close(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays; nobody answers on it

    async def ping(args: dict[str, Any], emit: control.Emit) -> Any:
        return "pong"

    assert run_server(sock, {"ping": ping}, lambda: control.call(sock, "ping")) == "pong"
    assert not sock.exists()
