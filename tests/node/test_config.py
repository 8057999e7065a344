from __future__ import annotations

from pathlib import Path

import pytest

from dwcp.cli import main
from dwcp.errors import ConfigError
from dwcp.identity import NodeKey
from dwcp.node.config import append_peer, load_config, parse_address, parse_rate
from dwcp.node.metrics import NodeStats, make_registry, render
from dwcp.node.store import Store, check_image_name


def test_init_writes_config_key_and_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", str(tmp_path / "n"), "--listen", "127.0.0.1:7411"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("ed25519:")
    cfg = load_config(tmp_path / "n" / "node.toml")
    assert cfg.listen.port == 7411 and cfg.name == "n"
    assert NodeKey.load(cfg.key_path).public.text == out[-1]
    Store(cfg.data_dir).check()
    assert (cfg.data_dir.stat().st_mode & 0o077) == 0
    # a second init refuses to clobber
    assert main(["init", str(tmp_path / "n"), "--listen", "127.0.0.1:7411"]) == 2


def test_peers_add_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["init", str(tmp_path / "a"), "--listen", "127.0.0.1:7412"])
    cfgp = str(tmp_path / "a" / "node.toml")
    key = NodeKey.generate().public.text
    assert main(["--config", cfgp, "peers", "add", "b", "127.0.0.1:7413", key]) == 0
    assert main(["--config", cfgp, "peers", "add", "b", "127.0.0.1:7414", key]) == 2
    capsys.readouterr()
    assert main(["--config", cfgp, "peers"]) == 0
    out = capsys.readouterr().out
    assert "b" in out and "127.0.0.1:7413" in out and "not running" in out
    cfg = load_config(cfgp)
    assert cfg.peer("b").public_key.text == key
    with pytest.raises(ConfigError, match="unknown peer 'c'"):
        cfg.peer("c")
    assert "# Trusted peers" in Path(cfgp).read_text()  # comments kept


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[node]\nlisten = 5\n", r"node\.listen: expected a non-empty string, got 5"),
        ("[node]\nlisten = 'h:99999'\n", r"node\.listen: expected HOST:PORT"),
        ("[node]\nlisten = 'h:1'\n[limits]\nlevel = 99\n", r"limits\.level: expected an integer"),
        ("[node]\nlisten = 'h:1'\nbogus = 1\n", r"node\.bogus"),
        ("[nodes]\n", r"\[nodes\]: unknown section"),
        (
            "[node]\nlisten = 'h:1'\n[[peers]]\nname = 'x'\naddress = 'h:2'\npublic_key = 'zz'\n",
            r"peers\[0\]\.public_key",
        ),
        ("[node\n", "not valid TOML"),
        ("[node]\nlisten = 'h:1'\n[limits]\nbwlimit = 'fast'\n", r"limits\.bwlimit"),
    ],
)
def test_config_errors_name_file_key_and_expectation(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "node.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(p)
    assert str(p) in str(info.value)


def test_missing_config_says_how_to_create(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dwcp init"):
        load_config(tmp_path / "nope.toml")


def test_append_peer_validates(tmp_path: Path) -> None:
    main(["init", str(tmp_path / "a"), "--listen", "127.0.0.1:7415"])
    cfg = load_config(tmp_path / "a" / "node.toml")
    with pytest.raises(ConfigError):
        append_peer(cfg, "bad name", "h:1", NodeKey.generate().public.text)
    with pytest.raises(ConfigError):
        append_peer(cfg, "ok", "h:notaport", NodeKey.generate().public.text)


def test_parsers() -> None:
    assert parse_rate("100Mbit") == 12_500_000
    assert parse_rate("10M") == 10 * 1024 * 1024
    assert parse_rate(5) == 5
    with pytest.raises(ValueError):
        parse_rate("lots")
    assert str(parse_address("[::1]:7400")) == "[::1]:7400"
    assert parse_address("example.org").port == 7400
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            check_image_name(bad)


def test_metrics_render() -> None:
    stats = NodeStats(bytes_sent=10, bytes_raw=30, bytes_compressed=10, active_out=1)
    text = render(make_registry(stats)).decode()
    assert "dwcp_bytes_sent_total 10.0" in text
    assert "dwcp_compression_ratio 3.0" in text
    assert 'dwcp_active_transfers{direction="out"} 1.0' in text
    assert "dwcp_consensus" not in text  # no [consensus]: no such families
    stats.consensus = lambda: {
        "connected": 4,
        "requests": {"migrate:ok": 2, "get:unknown": 1},
        "view": 1,
        "executed": 7,
    }
    text = render(make_registry(stats)).decode()
    assert "dwcp_consensus_replicas_connected 4.0" in text
    assert 'dwcp_consensus_requests_total{op="migrate",result="ok"} 2.0' in text
    assert "dwcp_consensus_view 1.0" in text and "dwcp_consensus_executed 7.0" in text


def test_consensus_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dwcp.node.ownership import Ownership

    main(["init", str(tmp_path / "a"), "--listen", "127.0.0.1:7415"])
    cfgp = tmp_path / "a" / "node.toml"
    me = NodeKey.load(tmp_path / "a" / "node.key")
    base = cfgp.read_text()
    cfgp.write_text(base + '\n[consensus]\ncluster = "cluster.json"\n')
    with pytest.raises(ConfigError, match=r"consensus\.cluster: expected an existing cluster"):
        load_config(cfgp)
    others = [NodeKey.generate().public.text for _ in range(3)]
    replicas = [
        f"--replica={k}@127.0.0.1:{7500 + i}" for i, k in enumerate([*others, me.public.text])
    ]
    assert main(["cluster", "init", str(tmp_path / "a" / "cluster.json"), *replicas]) == 0
    assert "tolerates f = 1" in capsys.readouterr().out
    cfgp.write_text(base + '\n[consensus]\ncluster = "cluster.json"\nreplica = 3\nquorum = 2\n')
    with pytest.raises(ConfigError, match=r"consensus\.quorum: expected one of the known keys"):
        load_config(cfgp)
    cfgp.write_text(base + '\n[consensus]\ncluster = "cluster.json"\nreplica = 0\n')
    cfg = load_config(cfgp)
    assert cfg.consensus is not None and cfg.consensus.replica == 0
    with pytest.raises(ConfigError, match="replica = 0: the cluster file lists another key"):
        Ownership(cfg.consensus, me, tmp_path)
    stranger = NodeKey.generate()
    with pytest.raises(ConfigError, match="not among the cluster's clients"):
        Ownership(cfg.consensus, stranger, tmp_path)
