"""The node's job list (issue 16): running and recent migrations, ``dwcp jobs``.

``JobTable`` is a plain state machine fed ``MigrationEvent``s and ``now``: it keeps
every running migration and the last ``HISTORY`` finished ones (bounded, whatever
the peers do). ``Jobs`` is the service around it: it listens to ``Migrations``,
answers the control operations ``jobs`` and ``jobs_cancel``, and keeps the
finished jobs in ``DATA/jobs.json`` so the history survives a restart.

Cancelling an outgoing migration stops its task: the destination keeps what it
received (``partial/ID``), so re-running the same ``dwcp migrate`` resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dwcp.errors import UsageError
from dwcp.node.control import Emit, Handler
from dwcp.node.migrations import MigrationEvent, Migrations
from dwcp.node.service import BaseService

log = logging.getLogger("dwcp.node")
HISTORY = 50  # finished jobs kept (in memory and in jobs.json)
FINISHED = ("ok", "failed", "stopped")
_FIGURES = ("phase", "bytes_image", "bytes_to_send", "bytes_sent", "bytes_wire", "dedup_ratio")


class JobTable:
    """Running and recent migrations, from their events (no I/O, no clock)."""

    def __init__(self, history: list[dict[str, Any]] | None = None) -> None:
        self.running: dict[str, dict[str, Any]] = {}
        self.finished: deque[dict[str, Any]] = deque((history or [])[-HISTORY:], maxlen=HISTORY)
        self.cancelling: set[str] = set()

    def on_event(self, ev: MigrationEvent, now: float) -> dict[str, Any] | None:
        """Apply one event; the job's record if it just finished (to persist), else None."""
        if ev.kind == "started":
            self.running[ev.id] = {
                "id": ev.id,
                "direction": ev.direction,
                "name": ev.name,
                "peer": ev.peer,
                "state": "running",
                "phase": "starting",
                "started": now,
                "ended": None,
                "bytes_image": 0,
                "bytes_to_send": 0,
                "bytes_sent": 0,
                "bytes_wire": 0,
                "dedup_ratio": 0.0,
                "rate": 0.0,
                "error": None,
            }
            return None
        job = self.running.get(ev.id)
        if job is None:  # started before this table existed: nothing to show
            return None
        if ev.name:
            job["name"] = ev.name
        for k in _FIGURES:
            if k in ev.data:
                job[k] = ev.data[k]
        elapsed = max(now - job["started"], 1e-9)
        job["rate"] = round(job["bytes_wire"] / elapsed, 1)  # wire bytes per second
        if ev.kind not in FINISHED:
            return None
        del self.running[ev.id]
        cancelled = ev.id in self.cancelling
        self.cancelling.discard(ev.id)
        job["state"] = "cancelled" if cancelled and ev.kind == "stopped" else ev.kind
        job["ended"] = now
        if ev.kind == "failed":
            job["error"] = str(ev.data.get("error", ""))
        elif ev.kind == "stopped":
            job["error"] = "cancelled by 'dwcp jobs cancel'" if cancelled else "stopped"
        self.finished.append(job)
        return job

    def jobs(self) -> list[dict[str, Any]]:
        """Running jobs first (oldest first), then the finished ones, newest first."""
        running = sorted(self.running.values(), key=lambda j: j["started"])
        return [dict(j) for j in running] + [dict(j) for j in reversed(self.finished)]


def load_history(path: Path) -> list[dict[str, Any]]:
    """The finished jobs a previous run kept; an unreadable file is logged and ignored
    (the history is informative, it must not keep the node from starting)."""
    try:
        doc = json.loads(path.read_text())
        jobs = doc["jobs"]
        if not isinstance(jobs, list):
            raise ValueError("jobs is not a list")
        return [j for j in jobs if isinstance(j, dict) and isinstance(j.get("id"), str)]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the job history %s: %s", path, exc)
        return []


def save_history(path: Path, jobs: list[dict[str, Any]]) -> None:
    """Write ``jobs`` through a temp file, fsync and rename (never a torn file)."""
    fd, tmp = tempfile.mkstemp(prefix=".jobs.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"jobs": jobs}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Jobs(BaseService):
    """``dwcp jobs``: the job table of this node's migrations, kept across restarts."""

    name = "jobs"

    def __init__(
        self, migrations: Migrations, path: Path, clock: Callable[[], float] | None = None
    ) -> None:
        self.migrations = migrations
        self.path = path
        self.clock = clock or time.time
        self.table = JobTable(load_history(path))
        migrations.add_listener(self._on_event)

    def handlers(self) -> Mapping[str, Handler]:
        return {"jobs": self.op_jobs, "jobs_cancel": self.op_cancel}

    def _on_event(self, ev: MigrationEvent) -> None:
        done = self.table.on_event(ev, self.clock())
        if done is not None:
            # Once per migration, a few KiB: written inline so the order of writes is the
            # order of events (a crash loses at most the job that was finishing).
            try:
                save_history(self.path, list(self.table.finished))
            except OSError as exc:
                log.warning("could not save the job history %s: %s", self.path, exc)

    async def op_jobs(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Control operation ``jobs``: {} -> {"jobs": [...]}."""
        return {"jobs": self.table.jobs(), "now": self.clock()}

    async def op_cancel(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Control operation ``jobs_cancel``: {id} -> the job being cancelled."""
        jid = str(args.get("id", ""))
        job = self.table.running.get(jid)
        if job is None or job["direction"] != "out":
            known = next((j for j in self.table.finished if j["id"] == jid), None)
            if known is not None:
                raise UsageError(f"job {jid} already ended ({known['state']}); nothing to cancel")
            if job is not None:
                raise UsageError(
                    f"job {jid} is an incoming migration: cancel it on the node that sends it"
                )
            raise UsageError(f"no running job {jid!r}; 'dwcp jobs' lists them")
        if not self.migrations.cancel(jid):
            raise UsageError(f"job {jid} is ending; 'dwcp jobs' shows how it ended")
        self.table.cancelling.add(jid)
        return dict(job, state="cancelling")
