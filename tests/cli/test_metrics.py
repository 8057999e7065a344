"""``/metrics`` as a Prometheus server reads it (issue 16): fetched over HTTP and parsed by
prometheus-client's own parser, with process and build info beside the node's figures."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from node.cluster import NodeProc, free_udp_port
from prometheus_client.parser import text_string_to_metric_families

import dwcp


def test_metrics_parse_with_prometheus_client(tmp_path: Path) -> None:
    port = free_udp_port(socket.SOCK_STREAM)
    a = NodeProc(tmp_path, "a", metrics_port=port)
    a.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            assert r.status == 200
            text = r.read().decode()
    finally:
        a.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    build = families["dwcp_build_info"].samples
    assert build[0].labels == {"version": dwcp.__version__, "protocol": str(dwcp.PROTOCOL_VERSION)}
    assert build[0].value == 1
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    assert "python_info" in families
    assert families["dwcp_bytes_sent"].type == "counter"
    assert families["dwcp_bytes_sent"].samples[0].value == 0
    active = {s.labels["direction"]: s.value for s in families["dwcp_active_transfers"].samples}
    assert active == {"in": 0, "out": 0}


def test_metrics_port_in_use_fails_the_start_naming_it(tmp_path: Path) -> None:
    import subprocess

    from node.cluster import ENV, PY

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        a = NodeProc(tmp_path, "a", metrics_port=port)
        r = subprocess.run(
            [PY, "-m", "dwcp.node", "--config", str(a.config)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
    assert r.returncode != 0
    assert f"metrics on 127.0.0.1:{port}" in r.stderr and "metrics_listen" in r.stderr
