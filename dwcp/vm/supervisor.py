"""The node's VM service: define, start, stop and list QEMU VMs (control ops ``vm_*``).

Why QEMU is daemonized rather than a child of the node: a VM must not die
with the node (a node restart, an upgrade, or a node killed mid-migration
must leave the VM running on exactly one host). At start the supervisor
adopts every VM whose ``qemu.pid`` names a live QEMU, through its QMP socket;
the VM's state is QEMU's own (``query-status``), asked when it is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dwcp.errors import UsageError, VmError
from dwcp.live.node import LiveMigrator
from dwcp.node.context import NodeContext
from dwcp.node.control import Emit, Handler
from dwcp.node.service import BaseService
from dwcp.node.store import check_image_name
from dwcp.vm import definition as vmdef
from dwcp.vm.definition import VmDefinition, VmPaths
from dwcp.vm.qmp import QmpClient, QmpClosedError

log = logging.getLogger("dwcp.vm")
LAUNCH_SECONDS = 30.0  # QEMU's daemonizing parent returns once the VM is set up
QUIT_SECONDS = 10.0


def qemu_pid(paths: VmPaths) -> int | None:
    """The pid in ``qemu.pid`` if that process is alive and is a QEMU (pid reuse checked)."""
    try:
        pid = int(paths.pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"qemu-system" in cmdline.split(b"\0", 1)[0] else None


class VmSupervisor(BaseService):
    name = "vms"

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.qmp: dict[str, QmpClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.live = LiveMigrator(self)
        self.live.register()  # its peer channels, before the node accepts sessions

    @property
    def vms_dir(self) -> Path:
        return self.ctx.config.data_dir / "vms"

    def paths(self, name: str) -> VmPaths:
        return VmPaths(self.vms_dir / check_image_name(name))

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def handlers(self) -> Mapping[str, Handler]:
        return {
            "vm_define": self.op_define,
            "vm_start": self.op_start,
            "vm_stop": self.op_stop,
            "vm_list": self.op_list,
            "vm_status": self.op_status,
            "migrate_live": self.live.op_migrate_live,
        }

    async def start(self) -> None:
        self.vms_dir.mkdir(mode=0o700, exist_ok=True)
        for d in sorted(self.vms_dir.iterdir()):
            if (d / "vm.json").is_file() and qemu_pid(VmPaths(d)) is not None:
                with contextlib.suppress(VmError):
                    await self.attach(d.name)
                    log.info("adopted running VM %s", d.name, extra={"event": "vm_adopted"})
            if (d / "vm.json").is_file():
                self.live.after_restart(d.name)  # settles a migration a crash interrupted

    async def stop(self) -> None:
        """Leave the VMs running (see the module docstring); close our QMP connections."""
        await self.live.stop()
        for c in list(self.qmp.values()):
            await c.close()
        self.qmp.clear()

    # --- helpers used by live migration too -------------------------------------

    async def attach(self, name: str) -> QmpClient:
        """The QMP connection to the running VM ``name`` (connected on demand)."""
        c = self.qmp.get(name)
        if c is not None and not c.closed:
            return c
        p = self.paths(name)
        if qemu_pid(p) is None:
            raise VmError(f"VM {name} is not running on this node: 'dwcp vm start {name}'")
        c = await QmpClient.connect(str(p.qmp))
        self.qmp[name] = c
        return c

    async def state(self, name: str) -> tuple[str, int | None]:
        """QEMU's run state (``running``, ``paused``, ``inmigrate``, ...) or ``stopped``."""
        p = self.paths(name)
        pid = qemu_pid(p)
        if pid is None:
            old = self.qmp.pop(name, None)
            if old is not None:
                await old.close()
            return "stopped", None
        try:
            got = await (await self.attach(name)).execute("query-status")
        except QmpClosedError:
            return "stopped", None
        except VmError:
            # QEMU 7.2's multifd: a channel that breaks while the destination waits for its
            # sync hangs QEMU's main loop (QMP silent for good). A copy that never ran is
            # only ever killed, so saying "inmigrate" lets the callers settle it.
            if p.incoming.exists():
                return "inmigrate", pid
            raise
        return str(got.get("status", "unknown")), pid

    async def launch(
        self, d: VmDefinition, incoming: str | None = None, disk_path: Path | None = None
    ) -> QmpClient:
        """Start QEMU for ``d`` (paused with ``-S``) and connect QMP; ``disk_path``: a
        staging disk file instead of the store's (an incoming live migration)."""
        p = self.paths(d.name)
        disk = disk_path or self.ctx.store.images_dir / d.disk
        if not disk.is_file():
            raise UsageError(
                f"disk image {d.disk} is not in this node's store ({self.ctx.store.images_dir}): "
                "copy it there or migrate it here first"
            )
        argv = vmdef.qemu_argv(d, p, disk, vmdef.detect_accel(), incoming)
        with contextlib.suppress(FileNotFoundError):
            p.qmp.unlink()
        if incoming is not None:
            p.incoming.touch()
        # A thread and subprocess.run, not asyncio's subprocesses: under uvloop, waiting for
        # a daemonizing QEMU's pipe hangs (the parent exits; its child keeps running).
        try:
            proc = await asyncio.to_thread(
                subprocess.run,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=LAUNCH_SECONDS,
                start_new_session=True,  # a Ctrl-C at the node's terminal is not the VM's
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise VmError(f"QEMU for {d.name} did not start within {LAUNCH_SECONDS:g} s") from None
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise VmError(f"QEMU refused to start {d.name}: {msg[-1] if msg else proc.returncode}")
        return await self.attach(d.name)

    async def quit(self, name: str, *, force: bool = False) -> bool:
        """Stop QEMU (``quit``, then SIGKILL after ``QUIT_SECONDS``); False if not running.
        ``force``: SIGKILL at once (an incoming copy that never ran: nothing to flush)."""
        p = self.paths(name)
        pid = qemu_pid(p)
        if pid is None:
            return False
        gone = False
        try:
            if not force:
                c = await self.attach(name)
                with contextlib.suppress(QmpClosedError):
                    await c.execute("quit")
                gone = await c.wait_closed(QUIT_SECONDS)
        except VmError:
            gone = False
        self.qmp.pop(name, None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + QUIT_SECONDS
        while qemu_pid(p) == pid and loop.time() < deadline:
            if not gone:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.05)
        return True

    async def claim(self, name: str) -> None:
        """With ``[consensus]``: this node owns ``name`` (registering it if unknown)."""
        if self.ctx.ownership is not None:
            await self.ctx.ownership.claim(name, self.ctx.key.public)

    # --- control operations ---------------------------------------------------------

    def _define(self, args: dict[str, Any]) -> VmDefinition:
        name = check_image_name(str(args.get("name", "")))
        p = self.paths(name)
        kernel, initrd = args.get("kernel"), args.get("initrd")
        d = VmDefinition(
            name=name,
            disk=str(args.get("disk", "")),
            memory_mib=vmdef.parse_memory(args.get("memory", 256)),
            cpus=int(args.get("cpus", 1)),
            kernel=kernel is not None,
            initrd=initrd is not None,
            append=args.get("append"),
            qemu_args=tuple(str(a) for a in args.get("qemu_args", ())),
        )
        p.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for src, dst in ((kernel, p.kernel), (initrd, p.initrd)):
            if src is not None:
                if not Path(src).is_file():
                    raise UsageError(f"{src}: no such file")
                vmdef.copy_atomic(Path(src), dst)
        vmdef.save(p, d)
        return d

    async def op_define(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        name = str(args.get("name", ""))
        async with self.lock(name):
            if (await self.state(name))[0] != "stopped":
                raise UsageError(f"VM {name} is running: 'dwcp vm stop {name}' first")
            return self._define(args).to_json()

    async def op_start(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        name = str(args.get("name", ""))
        async with self.lock(name):
            state, _ = await self.state(name)
            if state != "stopped":
                raise UsageError(f"VM {name} is already running here ({state})")
            d = self._define(args) if args.get("disk") else vmdef.load(self.paths(name))
            await self.claim(name)
            c = await self.launch(d)
            await c.execute("cont")
            log.info("started VM %s", name, extra={"event": "vm_started", "vm": name})
        return await self.op_status({"name": name}, emit)

    async def op_stop(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        name = str(args.get("name", ""))
        async with self.lock(name):
            was = await self.quit(name)
        log.info("stopped VM %s", name, extra={"event": "vm_stopped", "vm": name})
        return {"name": name, "was_running": was, "state": "stopped"}

    async def op_status(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        name = str(args.get("name", ""))
        d = vmdef.load(self.paths(name))
        state, pid = await self.state(name)
        row: dict[str, Any] = {
            "name": name,
            "state": state,
            "pid": pid,
            "disk": d.disk,
            "memory_mib": d.memory_mib,
            "cpus": d.cpus,
            "console": str(self.paths(name).console),
            "owner": None,
            "epoch": None,
        }
        own = self.ctx.ownership
        if own is not None:
            got = await own.owner(name)
            row["owner"], row["epoch"] = got.owner or None, got.epoch
        return row

    async def op_list(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        rows = []
        for d in sorted(self.vms_dir.iterdir()):
            if (d / "vm.json").is_file():
                rows.append(await self.op_status({"name": d.name}, emit))
        return rows
