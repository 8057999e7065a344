"""Operating a node (issue 16): ``peers remove``, SIGHUP reloads the config without a
restart (and survives a broken one), a port already in use is a clear startup error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

from node.cluster import ENV, PY, NodeProc, wait_until

from dwcp.node import control
from dwcp.node.config import load_config


def _peer_names(node: NodeProc) -> list[str]:
    r = node.cli("peers", "--json")
    return [p["name"] for p in json.loads(r.stdout.splitlines()[-1])["peers"]]


def test_peers_remove_forgets_a_peer_and_the_running_node_reloads(tmp_path: Path) -> None:
    a, b, c = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b"), NodeProc(tmp_path, "c")
    a.trust(b)
    a.trust(c)
    a.start()
    try:
        assert _peer_names(a) == ["b", "c"]
        r = a.cli("peers", "remove", "b", "--json")
        out = json.loads(r.stdout.splitlines()[-1])
        assert out["name"] == "b" and out["node_reloaded"] is True
        assert _peer_names(a) == ["c"]
        assert "[[peers]]" in a.config.read_text()  # c's table kept
        missing = a.cli("peers", "remove", "b", check=False)
        assert missing.returncode == 2 and "no peer named 'b'" in missing.stderr
        img = tmp_path / "x.raw"
        img.write_bytes(b"\1" * 65536)
        refused = a.cli("migrate", str(img), "--to", "b", check=False)
        assert refused.returncode != 0 and "b" in refused.stderr
    finally:
        a.stop()


def test_sighup_reloads_the_config_and_keeps_running_on_a_broken_one(tmp_path: Path) -> None:
    a, b = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b")
    a.start()
    try:
        assert a.proc is not None
        assert _peer_names(a) == []
        good = a.config.read_text()
        sock = load_config(a.config).control_path
        # An edit by hand (no 'dwcp peers add', which asks the node to reload itself).
        a.config.write_text(
            good + f'\n[[peers]]\nname = "b"\naddress = "127.0.0.1:{b.port}"\n'
            f'public_key = "{b.pubkey}"\n'
        )
        a.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: _peer_names(a) == ["b"], "the node to reload after SIGHUP")
        a.config.write_text(good + "\n[[peers]]\nname = 3\n")
        a.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in a.log.read_text(), "the reload failure logged")
        assert a.proc.poll() is None
        # The CLI itself refuses the broken file, so ask the node over its socket.
        assert control.call(sock, "status", timeout=30)["peers"] == ["b"]  # the previous config
    finally:
        a.config.write_text(good)
        assert a.stop() == 0


def test_a_port_already_in_use_is_named_and_never_reported_as_listening(tmp_path: Path) -> None:
    a, b = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b")
    a.trust(b)  # a node with no peer does not listen at all
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", a.port))
        r = subprocess.run(
            [PY, "-m", "dwcp.node", "--config", str(a.config)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
    assert r.returncode != 0
    assert f"127.0.0.1:{a.port}" in r.stderr
    assert "in use" in r.stderr and f"process {os.getpid()} (" in r.stderr
    assert "ready: listening" not in r.stderr
