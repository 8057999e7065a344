"""The per-peer path store and ``dwcp paths`` (PBA, issue 14)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from dwcp.cli import main
from dwcp.errors import UsageError
from dwcp.node.config import load_config
from dwcp.pba.parallelism import LinkSample
from dwcp.pba.paths import PathStore, Second, to_seconds

PEER = "n" + "ab" * 10


def _samples(rate: float, n: int, interval: float = 0.5) -> list[LinkSample]:
    return [LinkSample(i * interval, interval, rate, 0.05, 0.001, 2, 2) for i in range(1, n + 1)]


def test_half_second_samples_become_whole_seconds_and_idle_ones_are_dropped() -> None:
    s = _samples(40e6, 6)
    s.insert(3, LinkSample(1.75, 0.25, 0.0, 0.05, 0.0, 2, 2))  # no bulk transfer then
    out = to_seconds(s, wall_end=1000.0)
    assert [round(x.rate_bps) for x in out] == [40_000_000] * 3
    assert out[-1].t == pytest.approx(1000.0)
    assert out[0].rtt_s == pytest.approx(0.05)


def test_a_transfer_shorter_than_a_second_still_leaves_its_rate() -> None:
    # A fast migration (a few hundred ms of bulk data) used to leave no history at all.
    out = to_seconds(_samples(80e6, 3, interval=0.2), wall_end=500.0)
    assert [round(x.rate_bps) for x in out] == [80_000_000]
    assert out[0].t == pytest.approx(500.0)
    assert to_seconds(_samples(80e6, 1, interval=0.05), wall_end=500.0) == []  # too short


def test_a_session_is_kept_and_the_next_one_scores_its_forecasts(tmp_path: Path) -> None:
    store = PathStore(tmp_path / "paths")
    assert store.get(PEER) is None
    first = [Second(100.0 + i, 50e6, 0.04, 0.0) for i in range(30)]
    store.record_session(PEER, first, name="west", level=(3, 2))
    rec = store.get(PEER)
    assert rec is not None and rec.level == (3, 2) and len(rec.seconds) == 30
    assert rec.errors == []  # nothing predicted before the first session
    second = [Second(200.0 + i, 40e6, 0.04, 0.0) for i in range(5)]
    rec = store.record_session(PEER, second)
    assert rec.name == "west" and rec.level == (3, 2)
    errs = [e["error"] for e in rec.errors if e["kind"] == "1s"]
    assert len(errs) == 5 and errs[0] == pytest.approx(0.25)  # forecast 50 for an actual 40
    store.record_transfer(PEER, predicted_s=9.0, actual_s=10.0)
    row = store.get(PEER).summary(now=210.0)  # type: ignore[union-attr]
    assert row["samples"] == 35 and row["age_s"] == pytest.approx(6.0)
    assert row["transfer_error_median"] == pytest.approx(0.1)
    assert row["connections"] == 3 and row["p10_bps"] <= row["p50_bps"] <= row["p90_bps"]


def test_a_damaged_file_is_no_history_and_is_replaced_whole(tmp_path: Path) -> None:
    store = PathStore(tmp_path)
    (tmp_path / f"{PEER}.json").write_text('{"peer": ')
    assert store.get(PEER) is None
    store.record_session(PEER, [Second(1.0, 1e6, 0.01, 0.0)])
    assert store.get(PEER) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{PEER}.json"]


def test_a_peer_id_cannot_name_another_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="node id"):
        PathStore(tmp_path).get("../x")


def test_dwcp_paths_json_lists_each_peer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", str(tmp_path / "n"), "--listen", "127.0.0.1:7431"]) == 0
    capsys.readouterr()
    conf = tmp_path / "n" / "node.toml"
    assert main(["--config", str(conf), "paths", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"paths": []}
    store = PathStore(load_config(conf).data_dir / "paths")
    now = time.time()
    store.record_session(PEER, [Second(now - 30 + i, 20e6, 0.03, 0.0) for i in range(30)])
    assert main(["--config", str(conf), "paths", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.splitlines()[-1])["paths"]
    assert row["peer"] == PEER and row["samples"] == 30
    assert row["p50_bps"] == 20_000_000 and row["rtt_ms"] == 30.0
    assert {"p10_bps", "p90_bps", "loss", "age_s", "1s_error_median"} <= set(row)
    assert main(["--config", str(conf), "paths"]) == 0
    assert "20.0" in capsys.readouterr().out


def test_predict_gives_a_known_paths_rate_for_a_planner(tmp_path: Path) -> None:
    store = PathStore(tmp_path)
    assert store.predict(PEER) is None
    store.record_session(PEER, [Second(float(i), 30e6, 0.02, 0.0) for i in range(60)])
    d = store.predict(PEER, horizon_s=20)
    assert d is not None and d.horizon_s == 20 and d.p50 == pytest.approx(30e6)
    assert d.seconds(30_000_000 // 8 * 10)[1] == pytest.approx(10.0)


def test_updates_from_two_threads_at_once_are_all_kept(tmp_path: Path) -> None:
    store = PathStore(tmp_path)

    def sessions() -> None:
        for i in range(20):
            store.record_session(PEER, [Second(float(i), 1e6, 0.01, 0.0)])

    def transfers() -> None:
        for _ in range(20):
            store.record_transfer(PEER, 1.0, 2.0)

    threads = [threading.Thread(target=sessions), threading.Thread(target=transfers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec = store.get(PEER)
    assert rec is not None and len(rec.seconds) == 20
    assert sum(e["kind"] == "transfer" for e in rec.errors) == 20
