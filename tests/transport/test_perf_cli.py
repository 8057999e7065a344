"""``dwcp perf``: the client prints one JSON object; the server stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from dwcp.identity import NodeKey

KEYS = ("timeline", "goodput_bps", "bytes", "seconds", "rtt_ms", "loss", "connections", "streams")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_perf_client_and_server(tmp_path: Path) -> None:
    a, b = NodeKey.generate(), NodeKey.generate()
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    port = _free_udp_port()
    dwcp = [sys.executable, "-m", "dwcp.cli", "perf"]
    server = subprocess.Popen(
        [
            *dwcp,
            "--listen",
            f"127.0.0.1:{port}",
            "--key",
            str(tmp_path / "a"),
            "--trust",
            str(tmp_path / "b.pub"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "listening" in server.stdout.readline()
        client = subprocess.run(
            [
                *dwcp,
                f"127.0.0.1:{port}",
                "--key",
                str(tmp_path / "b"),
                "--trust",
                b.public.text,
                a.public.text,
                "--bytes",
                "8M",
                "--json",
                "--interval",
                "0.05",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert client.returncode == 0, client.stderr
        result = json.loads(client.stdout.strip().splitlines()[-1])
        for key in KEYS:
            assert key in result
        assert result["bytes"] == 8 << 20
        assert result["connections"] >= 1 and result["streams"] >= 1
        for point in result["timeline"]:
            assert set(point) >= {"t", "connections", "streams", "goodput_bps"}
        server.send_signal(signal.SIGTERM)
        _out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        assert "received 8388608 bytes" in err
    finally:
        server.kill()
        server.wait()
