"""``dwcp vm define|start|stop|list|status``: QEMU VMs supervised by the local node.

The node runs QEMU (KVM when it works here, TCG otherwise), keeps each VM's
definition under ``DATA/vms/NAME/`` and its serial console in
``DATA/vms/NAME/console.log``. ``vm start NAME --disk IMAGE`` defines and
starts in one step; with ``[consensus]`` the node first claims the VM in the
ownership registry (a VM owned by another node is refused). VMs keep running
when the node stops; the next node start adopts them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dwcp.cli._node import call_node, require_config


def _definition_flags(p: argparse.ArgumentParser, disk_required: bool) -> None:
    p.add_argument("--disk", required=disk_required, metavar="IMAGE", help="image in the store")
    p.add_argument("--memory", default="256M", help="RAM, e.g. 256M, 1G (default 256M)")
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--kernel", metavar="FILE", help="boot this kernel (copied into the VM's dir)")
    p.add_argument("--initrd", metavar="FILE")
    p.add_argument("--append", metavar="ARGS", help="kernel command line")
    p.set_defaults(passthrough=[])  # 'dwcp vm start NAME ... -- QEMU_ARGS' (see dwcp.cli.main)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("vm", help="run QEMU VMs on this node")
    vs = p.add_subparsers(dest="vm_command", metavar="ACTION", required=True)
    d = vs.add_parser("define", help="store a VM definition (the VM must be stopped)")
    d.add_argument("name", metavar="NAME")
    _definition_flags(d, disk_required=True)
    s = vs.add_parser(
        "start",
        help="start a VM (with --disk: define it first)",
        epilog="Extra QEMU arguments go last, after --.",
    )
    s.add_argument("name", metavar="NAME")
    _definition_flags(s, disk_required=False)
    t = vs.add_parser("stop", help="stop a VM (QEMU quits; the disk keeps what was written)")
    t.add_argument("name", metavar="NAME")
    ls = vs.add_parser("list", help="VMs defined here: name, state, pid, disk, owner, epoch")
    st = vs.add_parser("status", help="one VM's state")
    st.add_argument("name", metavar="NAME")
    for q in (d, s, t, ls, st):
        q.add_argument("--json", action="store_true", help="one JSON object on the last line")
    p.set_defaults(func=run)


def _definition_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"name": args.name, "qemu_args": list(args.passthrough)}
    if args.disk is None:
        return out
    out.update(disk=args.disk, memory=args.memory, cpus=args.cpus, append=args.append)
    for k in ("kernel", "initrd"):
        v = getattr(args, k)
        if v is not None:
            out[k] = str(Path(v).resolve())
    return out


def _line(r: dict[str, Any]) -> str:
    owner = "" if r.get("owner") is None else f"  owner {r['owner'][:16]} epoch {r['epoch']}"
    pid = "-" if r.get("pid") is None else str(r["pid"])
    return f"{r['name']:<20} {r['state']:<12} pid {pid:<8} disk {r['disk']}{owner}"


def run(args: argparse.Namespace) -> int:
    config = require_config(args)
    cmd = args.vm_command
    result: Any
    if cmd == "list":
        result = {"vms": call_node(config, "vm_list", {})}
    elif cmd == "status":
        result = call_node(config, "vm_status", {"name": args.name})
    elif cmd == "stop":
        result = call_node(config, "vm_stop", {"name": args.name}, timeout=60)
    else:
        result = call_node(config, f"vm_{cmd}", _definition_args(args), timeout=120)
    if args.json:
        print(json.dumps(result))
    elif cmd == "list":
        for r in result["vms"]:
            print(_line(r))
    elif cmd == "define":
        print(f"defined VM {result['name']} (disk {result['disk']})")
    elif cmd == "stop":
        print(f"VM {args.name} " + ("stopped" if result["was_running"] else "was not running"))
    else:
        print(_line(result))
    return 0
