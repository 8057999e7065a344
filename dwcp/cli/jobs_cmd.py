"""``dwcp jobs [cancel ID]``: the node's running and recent migrations, or stop one.

A cancelled migration stops cleanly: the destination keeps what it received, so
running the same ``dwcp migrate`` again resumes it. The history of finished jobs
(the last 50) survives a restart of the node.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from dwcp.cli._node import call_node, human_bytes, require_config


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "jobs", help="list running and recent migrations, or cancel one"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run_list)
    jsub = p.add_subparsers(dest="jobs_command", metavar="cancel")
    c = jsub.add_parser("cancel", help="stop a running migration: ID (re-running resumes it)")
    c.add_argument("id", metavar="ID", help="a job id from 'dwcp jobs'")
    c.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    c.set_defaults(func=run_cancel)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def run_list(args: argparse.Namespace) -> int:
    config = require_config(args)
    doc: dict[str, Any] = call_node(config, "jobs")
    if args.json:
        print(json.dumps(doc))
        return 0
    jobs = doc["jobs"]
    if not jobs:
        print("no migrations since the job history began")
        return 0
    print(f"{'ID':<12}  {'DIR':<3}  {'STATE':<9}  {'PEER':<10}  {'SENT':>10}  {'RATE':>12}  NAME")
    for j in jobs:
        rate = f"{human_bytes(j['rate'])}/s"
        print(
            f"{j['id']:<12}  {j['direction']:<3}  {j['state']:<9}  {j['peer']:<10}  "
            f"{human_bytes(j['bytes_wire']):>10}  {rate:>12}  {j['name'] or '-'}"
        )
        if j.get("error"):
            print(f"{'':<12}  ended {_when(j.get('ended'))}: {j['error']}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    config = require_config(args)
    job: dict[str, Any] = call_node(config, "jobs_cancel", {"id": args.id})
    if args.json:
        print(json.dumps(job))
    else:
        print(
            f"cancelling job {job['id']} ({job['name']} -> {job['peer']}); "
            "the destination keeps what it received: re-run the migration to resume it"
        )
    return 0
