"""``dwcp jobs`` and ``dwcp jobs cancel ID`` (issue 16): the node lists a running
migration with its figures, cancelling it stops it cleanly (the destination keeps the
partial, the re-run resumes), and the history survives a restart of the node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.cluster import NodeProc, make_image, sha256_file, wait_until

from dwcp.node.jobs import HISTORY, JobTable
from dwcp.node.migrations import MigrationEvent


def _jobs(node: NodeProc) -> list[dict[str, Any]]:
    r = node.cli("jobs", "--json")
    return list(json.loads(r.stdout.splitlines()[-1])["jobs"])


def test_jobs_lists_cancels_resumes_and_keeps_the_history(tmp_path: Path) -> None:
    a, b = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b")
    a.trust(b)
    b.trust(a)
    img = tmp_path / "vm.raw"
    make_image(img, 24, seed=7)
    a.start()
    b.start()
    try:
        assert _jobs(a) == []
        mig = a.popen_cli("migrate", str(img), "--to", "b", "--bwlimit", "2M", "--json")
        try:

            def sending() -> bool:
                js = _jobs(a)
                return bool(js) and js[0]["state"] == "running" and js[0]["bytes_sent"] > 1 << 20

            wait_until(sending, "the migration to send data")
            job = _jobs(a)[0]
            assert job["direction"] == "out" and job["peer"] == "b" and job["name"] == "vm.raw"
            assert job["rate"] > 0 and job["bytes_wire"] > 0
            text = a.cli("jobs").stdout
            assert job["id"] in text and "running" in text
            r = a.cli("jobs", "cancel", job["id"], "--json")
            assert json.loads(r.stdout.splitlines()[-1])["state"] == "cancelling"
            _, err = mig.communicate(timeout=120)
        finally:
            if mig.poll() is None:
                mig.kill()
                mig.wait()
        assert mig.returncode != 0 and "cancelled" in err, err
        done = _jobs(a)[0]
        assert done["id"] == job["id"] and done["state"] == "cancelled", done
        wait_until(lambda: any(b.partial.iterdir()), "b to keep the partial transfer")
        assert not (b.images / "vm.raw").exists()
        again = a.cli("jobs", "cancel", job["id"], check=False)
        assert again.returncode == 2 and "already ended (cancelled)" in again.stderr
        res = a.migrate_json(str(img), "--to", "b")
        assert res["resumed"] is True and res["bytes_sent"] < res["bytes_image"]
        assert sha256_file(b.images / "vm.raw") == sha256_file(img)
        a.stop()
        a.start()
        states = [(j["state"], j["name"]) for j in _jobs(a)]
        assert states == [("ok", "vm.raw"), ("cancelled", "vm.raw")]
        incoming = _jobs(b)[0]  # the destination lists its side too
        assert (incoming["direction"], incoming["state"], incoming["name"]) == (
            "in",
            "ok",
            "vm.raw",
        )
        unknown = a.cli("jobs", "cancel", "nope", check=False)
        assert unknown.returncode == 2 and "no running job 'nope'" in unknown.stderr
    finally:
        for n in (a, b):
            if n.proc is not None:
                n.stop()


def test_the_job_table_is_bounded_and_ignores_unknown_ids() -> None:
    t = JobTable()
    assert (
        t.on_event(MigrationEvent("x", "out", "progress", "n", "p", {"bytes_sent": 1}), 0) is None
    )
    for i in range(HISTORY + 10):
        t.on_event(MigrationEvent(str(i), "out", "started", "n", "p"), float(i))
        t.on_event(MigrationEvent(str(i), "out", "progress", "n", "p", {"bytes_wire": 10}), i + 1.0)
        done = t.on_event(
            MigrationEvent(str(i), "out", "failed", "n", "p", {"error": "e"}), i + 2.0
        )
        assert done is not None and done["state"] == "failed" and done["rate"] == 5.0
    assert t.running == {} and len(t.jobs()) == HISTORY
    assert t.jobs()[0]["id"] == str(HISTORY + 9)


def test_a_detached_migration_runs_on_without_the_cli(tmp_path: Path) -> None:
    a, b = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b")
    a.trust(b)
    b.trust(a)
    img = tmp_path / "vm.raw"
    make_image(img, 4, seed=9)
    a.start()
    b.start()
    try:
        r = a.cli("migrate", str(img), "--to", "b", "--detach", "--bwlimit", "2M", "--json")
        started = json.loads(r.stdout.splitlines()[-1])
        assert started["detached"] is True and started["name"] == "vm.raw"
        jid = started["id"]

        def state() -> str:
            return next((j["state"] for j in _jobs(a) if j["id"] == jid), "absent")

        wait_until(lambda: state() == "ok", "the detached migration to finish")
        assert sha256_file(b.images / "vm.raw") == sha256_file(img)
        both = a.cli("migrate", str(img), "--to", "b", "--detach", "--dry-run", check=False)
        assert both.returncode == 2 and "--detach and --dry-run" in both.stderr
    finally:
        a.stop()
        b.stop()
