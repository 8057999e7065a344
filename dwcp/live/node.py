"""The node's side of live migration: ``migrate_live`` (source) and the incoming channels.

Source: claim the VM, open a ``dwcp-live/1`` control channel to the peer and send the
definition (kernel and initrd included). The destination starts QEMU paused under
``-incoming defer`` on a fresh disk file, exports that disk over NBD and listens for the
migration stream (main and multifd connections), each on a private unix socket; every
QEMU connection is relayed over its own channel, re-made in accept order (``fanout``).
Disk: ``blockdev-mirror sync=full`` to the NBD export until READY. RAM: QEMU pre-copy with
``pause-before-switchover``; at ``pre-switchover`` (source paused) the mirror is completed,
the final state sent, the destination asked whether its QEMU has loaded it (``check``:
QEMU's "completed" at the source only means the bytes left), ownership committed through
PBFT (with ``[consensus]``), and only then does the destination ``cont``. Any failure
before the commit: the source resumes and the destination discards its QEMU and disk
file (``phases.Outcome``); a hand-over whose answer was lost is decided by asking the
registry. A node that crashed meanwhile settles its VMs at restart (``recover``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dwcp import framing
from dwcp.errors import ConsensusError, DwcpError, MigrationAbortedError, UsageError, VmError
from dwcp.identity import PublicKey
from dwcp.live import fanout, hold, postcopy, precopy, recover
from dwcp.live.control import CONTROL, MAX_FRAME, RELAY, disk_size, encode_msg, read_msg, stage
from dwcp.live.converge import Converger
from dwcp.live.host import VmHost
from dwcp.live.phases import Outcome, Phase, PhaseMachine
from dwcp.live.relay import Counter
from dwcp.node.control import Emit
from dwcp.node.store import check_image_name
from dwcp.vm import definition as vmdef
from dwcp.vm.definition import VmDefinition
from dwcp.vm.qmp import QmpClient, QmpClosedError

if TYPE_CHECKING:
    from dwcp.transport import Channel, Session

log = logging.getLogger("dwcp.live")
POLL = 0.1
WAIT_RUN_SECONDS = 1800.0  # destination: longest a prepared migration may wait for the run


class LiveMigrator:
    """Both ends of live migration, sharing the supervisor's QMP connections and locks."""

    def __init__(self, vms: VmHost) -> None:
        self.vms = vms
        self.ctx = vms.ctx
        # migration id -> kind -> (QEMU's unix socket, the order its connections are made in)
        self.targets: dict[str, dict[str, tuple[Path, fanout.Turns]]] = {}
        self.tasks: set[asyncio.Task[None]] = set()  # incoming control and relay channels

    def register(self) -> None:
        self.ctx.sessions.add_channel_handler(CONTROL, self._on_control)
        self.ctx.sessions.add_channel_handler(RELAY, self._on_relay)

    # --- source ---------------------------------------------------------------------

    async def op_migrate_live(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        ctx = self.ctx
        if ctx.draining:
            raise UsageError("the node is shutting down; re-run when it is back")
        await ctx.reload()
        name = check_image_name(str(args.get("name", "")))
        peer = ctx.config.peer(str(args.get("to", "")))
        limits = (args.get("downtime_limit"), args.get("max_downtime"))
        conv = precopy.policy(*limits, args.get("converge_timeout"), bool(args.get("postcopy")))
        multifd, lanes = precopy.channels(args.get("multifd"), args.get("lanes"), conv.postcopy)
        qz = multifd > 0 and args.get("compress") == "qemu"  # else the relay's zstd
        async with self.vms.lock(name):
            state, _ = await self.vms.state(name)
            if state != "running":
                raise UsageError(
                    f"VM {name} is not running on this node ({state}): 'dwcp vm list' shows "
                    f"where it is; 'dwcp vm start {name}' starts it here"
                )
            return await self._migrate(name, peer, conv, (multifd, lanes, qz), emit)

    async def _migrate(
        self, name: str, peer: Any, conv: Any, chans: tuple[int, int, bool], emit: Emit
    ) -> dict[str, Any]:
        ctx, loop = self.ctx, asyncio.get_running_loop()
        pm = PhaseMachine()
        t0 = loop.time()
        pm.start(t0)
        d = vmdef.load(self.vms.paths(name))
        paths = self.vms.paths(name)
        qmp = await self.vms.attach(name)
        await recover.undo_source(qmp)  # what an interrupted earlier run left (node crash)
        mid = secrets.token_hex(8)
        claim = None
        if ctx.ownership is not None:
            emit({"phase": pm.phase.value})
            async with asyncio.timeout(pm.remaining(loop.time())):
                claim = await ctx.ownership.claim(name, peer.public_key)
        session = await ctx.sessions.checkout(peer)
        sessions = [session]  # the multifd channels' lanes (fanout.lane_of)
        relays: list[asyncio.Task[None]] = []
        servers: list[asyncio.Server] = []
        disk_bytes, ram_counter = Counter(), Counter()
        chan: Channel | None = None
        result: dict[str, Any] = {}
        try:
            pm.advance(Phase.PREPARE, loop.time())
            emit({"phase": pm.phase.value})
            chan = await session.open_channel(CONTROL)
            fmt, size = await asyncio.to_thread(disk_size, ctx.store.images_dir / d.disk)
            prep = {"op": "prepare", "id": mid, "def": d.to_json(), "format": fmt, "size": size,
                    "multifd": chans[0], "qemu_zstd": chans[2],
                    "postcopy": conv.postcopy}  # fmt: skip
            chan.writer.write(encode_msg(prep))
            for present, f in ((d.kernel, paths.kernel), (d.initrd, paths.initrd)):
                if present:
                    chan.writer.write(framing.encode(await asyncio.to_thread(f.read_bytes)))
            await chan.writer.drain()
            got = await read_msg(chan.reader, pm.remaining(loop.time()))
            if not got.get("ok"):
                raise VmError(f"{peer.name} cannot take VM {name}: {got.get('error')}")

            for _ in range(1, min(chans[1], chans[0] + 1)):
                sessions.append(await ctx.sessions.checkout(peer))
            for kind, counter, lanes in (("nbd", disk_bytes, [session]),
                                         ("mig", ram_counter, sessions)):  # fmt: skip
                sock = paths.root / f"relay-{kind}.sock"
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
                packed = not (kind == "mig" and chans[2])
                opener = self._opener(lanes, mid, kind, packed)
                out = fanout.Fanout(opener, counter, relays, packed)
                servers.append(await asyncio.start_unix_server(out, path=str(sock)))
            pm.advance(Phase.DISK, loop.time())
            emit({"phase": pm.phase.value})
            await qmp.execute(
                "blockdev-add",
                {
                    "driver": "nbd", "node-name": "tgt0", "export": "disk0",
                    "server": {"type": "unix", "path": str(paths.root / "relay-nbd.sock")},
                },
                timeout=min(60.0, pm.remaining(loop.time())),
            )  # fmt: skip
            await qmp.execute(
                "blockdev-mirror",
                {"job-id": "m0", "device": "disk0", "target": "tgt0", "sync": "full"},
            )
            await self._wait_job_ready(qmp, pm, emit)
            await hold.hold(paths.root, "disk")

            pm.advance(Phase.RAM, loop.time())
            emit({"phase": pm.phase.value})
            caps = [{"capability": "pause-before-switchover", "state": True}, *precopy.START_CAPS]
            caps += precopy.multifd_caps(chans[0]) + postcopy.caps(conv.postcopy)
            await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
            crawl = hold.wanted(paths.root, "ram")
            params: dict[str, Any] = {
                "max-bandwidth": hold.CRAWL_BYTES_PER_SECOND if crawl else 1 << 40,
                "downtime-limit": conv.downtime_ms,
                **precopy.START_PARAMS,
                **precopy.multifd_params(chans[0], chans[2]),
            }
            await qmp.execute("migrate-set-parameters", params)
            await qmp.execute("migrate", {"uri": f"unix:{paths.root / 'relay-mig.sock'}"})
            if crawl:
                await hold.hold(paths.root, "ram")
                await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
            converger = Converger(conv, loop.time())
            info = await precopy.wait_precopy(qmp, pm, converger, lambda: ram_counter.raw[0], emit)
            pm.postcopy = converger.postcopy is not None  # the ladder's last rung (--postcopy)

            pm.advance(Phase.SWITCH, loop.time())  # the source is paused from here
            emit({"phase": pm.phase.value})
            await hold.hold(paths.root, "switchover")
            if pm.postcopy:  # QEMU is still in pre-copy: pause the source before the commit
                await qmp.execute("stop")
            await qmp.execute("block-job-cancel", {"device": "m0"})
            await qmp.wait_event(
                "BLOCK_JOB_COMPLETED", pm.remaining(loop.time()), match={"device": "m0"}
            )
            await qmp.execute("blockdev-del", {"node-name": "tgt0"})
            if not pm.postcopy:  # postcopy: the commit comes first (``postcopy``)
                # QEMU answers once it has sent the final state (holding its main lock)
                await qmp.execute("migrate-continue", {"state": "pre-switchover"},
                                  timeout=max(1.0, pm.remaining(loop.time())))  # fmt: skip
                info = await precopy.wait_status(qmp, pm, ("completed",), emit)
                # QEMU's "completed" means the state left this host, not that the peer has
                # it (it may sit in a relay that dies): commit only once the peer says so.
                chan.writer.write(encode_msg({"op": "check"}))
                await chan.writer.drain()
                loaded = await read_msg(chan.reader, pm.remaining(loop.time()))
                if not loaded.get("ok"):
                    raise VmError(f"{peer.name} did not load the VM's state: {loaded.get('error')}")
            await hold.hold(paths.root, "committing")

            if pm.postcopy:  # the destination's cont waits on pages (``_run``)
                pm.deadlines[Phase.RUN] = postcopy.RUN_SECONDS
            pm.advance(Phase.COMMIT, loop.time())
            emit({"phase": pm.phase.value})
            owner, epoch = None, None
            if claim is not None:
                assert ctx.ownership is not None
                async with asyncio.timeout(pm.remaining(loop.time())):
                    got_own = await ctx.ownership.hand_over(claim, peer.public_key)
                owner, epoch = got_own.owner, got_own.epoch
            pm.advance(Phase.RUN, loop.time())  # committed: the destination owns the VM
            emit({"phase": pm.phase.value})
            await hold.hold(paths.root, "run")
            went = pm.postcopy and await postcopy.switch(qmp, pm, name, peer.name)
            chan.writer.write(encode_msg({"op": "run"}))
            await chan.writer.drain()
            ran = await read_msg(chan.reader, pm.remaining(loop.time()))
            if not ran.get("ok"):
                raise VmError(f"{peer.name} could not resume VM {name}: {ran.get('error')}")
            pm.advance(Phase.DONE, loop.time())
            if pm.postcopy:  # the destination runs the VM; the pages it lacks still flow
                info = await postcopy.finish(qmp, name, peer.name, emit, lambda: ram_counter.raw[0])
            ram = info.get("ram", {})
            result = {
                "name": name,
                "peer": peer.name,
                "live": True,
                "seconds": round(loop.time() - t0, 3),
                "downtime_ms": round((pm.downtime() or 0.0) * 1000, 1),
                "qemu_downtime_ms": info.get("downtime"),
                "bytes_ram": int(ram.get("transferred", 0)),
                "bytes_disk": disk_bytes.up + disk_bytes.down,
                "bytes_wire": disk_bytes.up + disk_bytes.down + ram_counter.up + ram_counter.down,
                "owner": owner,
                "epoch": epoch,
                "result": "completed",
                "downtime_limit_ms": converger.downtime_ms,
                "converge_rung": converger.rung,
                "multifd_channels": chans[0],
                "compress": "qemu" if chans[2] else "dwcp",
                "lanes": len(sessions),
                "postcopy": went,
            }
        except (DwcpError, OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            if chan is not None and pm.phase in (Phase.DISK, Phase.RAM):
                with contextlib.suppress(DwcpError, OSError):  # the peer discards its copy now
                    chan.writer.write(encode_msg({"op": "abort"}))
                    await chan.writer.drain()
            where = await self._fail(name, qmp, pm, exc, peer)
            raise self._error(peer.name, pm, exc, where) from None
        except BaseException:  # cancelled: same rule, then let the cancellation go on
            await asyncio.shield(self._fail(name, qmp, pm, None, peer))
            raise
        finally:
            for s in servers:
                s.close()
            for t in relays:
                t.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            if chan is not None:
                with contextlib.suppress(Exception):
                    chan.writer.close()
            for lane in sessions:
                ctx.sessions.checkin(lane, reuse=False)
        await self.vms.quit(name)  # the destination runs it: the source QEMU exits
        log.info("live-migrated VM %s to %s", name, peer.name, extra={"event": "live_ok"})
        return result

    def _opener(self, lanes: list[Session], mid: str, kind: str, packed: bool) -> fanout.Opener:
        async def open_channel(seq: int) -> tuple[Any, Any]:
            chan = await lanes[fanout.lane_of(seq, len(lanes))].open_channel(RELAY)
            hdr = {"id": mid, "kind": kind, "seq": seq, "packed": packed}
            chan.writer.write(encode_msg(hdr))
            await chan.writer.drain()  # NBD's server speaks first: the peer must connect now
            return chan.reader, chan.writer

        return open_channel

    async def _wait_job_ready(self, qmp: QmpClient, pm: PhaseMachine, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if pm.expired(loop.time()):
                raise VmError("the disk copy did not become ready in time")
            jobs = await qmp.execute("query-block-jobs")
            job = next((j for j in jobs if j.get("device") == "m0"), None)
            if job is None:
                raise VmError("the disk mirror stopped (the destination's NBD export went away)")
            emit({"phase": "disk", "disk_done": job.get("offset"), "disk_total": job.get("len")})
            log.debug("disk mirror %s", job, extra={"event": "live_disk"})
            if job.get("ready"):
                return
            await asyncio.sleep(POLL)

    async def _fail(self, name: str, qmp: QmpClient, pm: PhaseMachine, exc: Any, peer: Any) -> str:
        """Apply the failure rule (see ``phases``): before the commit, resume the source.
        Returns where the VM is, for the error message."""
        outcome = pm.on_failure()
        if outcome is Outcome.RESUME_SOURCE and pm.phase is Phase.COMMIT:
            # the hand-over was sent but its answer lost: only the registry knows
            owner = await recover.owner_of(self.vms, name)
            if owner is None and self.ctx.ownership is not None:
                log.warning("live migration of %s: the hand-over's outcome is unknown; the VM "
                            "stays paused here", name, extra={"event": "live_unknown"})  # fmt: skip
                return (f"VM {name} stays paused here, as the registry cannot say whether it "
                        f"moved to {peer.name}: restart this node once 'dwcp owner {name}' "
                        "answers, and it resumes the VM where the registry says")  # fmt: skip
            outcome = pm.settle(owner == peer.public_key.node_id)
        if outcome is Outcome.HOLD_SOURCE:  # postcopy: its memory may be needed at the peer
            log.warning("postcopy of %s to %s failed after the commit: its paused copy stays "
                        "here", name, peer.name, extra={"event": "live_postcopy_held"})  # fmt: skip
            return f"VM {name} is owned by {peer.name}; this node keeps its paused copy"
        if outcome is Outcome.DESTINATION_RUNS:
            with contextlib.suppress(DwcpError):
                await self.vms.quit(name)
            return f"VM {name} runs at {peer.name} (ownership committed)"
        await recover.undo_source(qmp)
        await recover.resume(qmp)
        log.info("live migration of %s failed in %s: %s; the VM runs here",
                 name, pm.phase.value, exc, extra={"event": "live_failed"})  # fmt: skip
        return f"VM {name} keeps running here"

    def _error(self, peer: str, pm: PhaseMachine, exc: BaseException, where: str) -> DwcpError:
        what = str(exc) or type(exc).__name__
        if isinstance(exc, MigrationAbortedError):
            return MigrationAbortedError(f"live migration to {peer} aborted: {what}; {where}")
        cls = ConsensusError if isinstance(exc, ConsensusError) else VmError
        again = "" if pm.postcopy and pm.committed else "; re-run the command to try again"
        return cls(f"live migration to {peer} failed while {pm.phase.value} ({what}); {where}"
                   f"{again}")  # fmt: skip

    # --- destination ----------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        """A session serves its channels one handler at a time: live migration's control
        and relay channels run at once, so each runs as its own task (cancelled at stop)."""
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def after_restart(self, name: str) -> None:
        """The node (re)started with VM ``name`` defined here: settle a migration its crash
        interrupted (``recover``), in the background (the registry may be slow to answer)."""
        self._spawn(self._after_restart(name))

    async def _after_restart(self, name: str) -> None:
        with contextlib.suppress(DwcpError, OSError):
            await recover.after_restart(self.vms, name)

    async def stop(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _on_relay(self, peer_key: PublicKey, session: Session, chan: Channel) -> None:
        self._spawn(self._relay_in(chan))

    async def _relay_in(self, chan: Channel) -> None:
        try:
            hdr = await read_msg(chan.reader, 30.0)
            target = self.targets.get(str(hdr.get("id")), {}).get(str(hdr.get("kind")))
            log.debug("relay %s to %s", hdr, target, extra={"event": "live_relay"})
            if target is None or not isinstance(seq := hdr.get("seq"), int):
                chan.writer.close()
                return
            sock = str(target[0])
            await fanout.relay_in(chan.reader, chan.writer, target[1], seq,
                                  lambda: asyncio.open_unix_connection(sock),
                                  hdr.get("packed", True) is not False)  # fmt: skip
        except (DwcpError, OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            chan.writer.close()

    async def _on_control(self, peer_key: PublicKey, session: Session, chan: Channel) -> None:
        self._spawn(self._control_in(peer_key, chan))

    async def _control_in(self, peer_key: PublicKey, chan: Channel) -> None:
        try:
            prep = await read_msg(chan.reader, 30.0)
            d = VmDefinition.from_json(prep["def"])
        except (DwcpError, TimeoutError, asyncio.IncompleteReadError, ValueError, KeyError):
            chan.writer.close()
            return
        async with self.vms.lock(d.name):
            await self._incoming(peer_key, chan, prep, d)

    async def _incoming(
        self, peer_key: PublicKey, chan: Channel, prep: dict[str, Any], d: VmDefinition
    ) -> None:
        paths = self.vms.paths(d.name)
        mid = str(prep.get("id"))
        disk = self.ctx.store.images_dir / f".{d.disk}.live-{mid}"
        launched = ran = False
        try:
            blobs = []
            for present in (d.kernel, d.initrd):
                if present:
                    async with asyncio.timeout(120.0):
                        blobs.append(await framing.read_frame(chan.reader, MAX_FRAME))
            if (await self.vms.state(d.name))[0] != "stopped":
                raise UsageError(f"VM {d.name} is already running at the destination")
            await asyncio.to_thread(stage, paths, d, blobs, disk, prep)
            qmp = await self.vms.launch(d, incoming="defer", disk_path=disk)
            launched = True
            for k in ("nbd", "mig"):
                with contextlib.suppress(FileNotFoundError):
                    (paths.root / f"{k}.sock").unlink()
            await qmp.execute(
                "nbd-server-start",
                {"addr": {"type": "unix", "data": {"path": str(paths.root / "nbd.sock")}}},
            )
            await qmp.execute(
                "block-export-add",
                {"type": "nbd", "id": "e0", "node-name": "disk0", "name": "disk0",
                 "writable": True},
            )  # fmt: skip
            await precopy.incoming_multifd(qmp, prep.get("multifd"), prep.get("qemu_zstd"))
            if prep.get("postcopy"):
                await postcopy.enable_incoming(qmp)
            await qmp.execute("migrate-incoming", {"uri": f"unix:{paths.root / 'mig.sock'}"})
            socks = {k: (paths.root / f"{k}.sock", fanout.Turns()) for k in ("nbd", "mig")}
            self.targets[mid] = socks
            chan.writer.write(encode_msg({"ok": True}))
            await chan.writer.drain()
            while True:
                try:
                    order = await read_msg(chan.reader, WAIT_RUN_SECONDS)
                except (DwcpError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                    order = {"op": "run"} if await self._own(d.name) else {"op": "abort"}
                if order.get("op") != "check":
                    break
                st = await self._loaded(qmp)
                err = f"its QEMU is {st or 'still inmigrate'}"
                chan.writer.write(encode_msg({"ok": st is not None, "state": st, "error": err}))
                await chan.writer.drain()
            if order.get("op") != "run":
                raise VmError("the source aborted the live migration")
            await self._run(qmp, d, disk)
            ran = True
            with contextlib.suppress(DwcpError, OSError):
                chan.writer.write(encode_msg({"ok": True, "state": "running"}))
                await chan.writer.drain()
        except (DwcpError, OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            log.info("incoming live migration of %s failed: %s", d.name, exc,
                     extra={"event": "live_in_failed"})  # fmt: skip
            with contextlib.suppress(DwcpError, OSError):
                chan.writer.write(encode_msg({"ok": False, "error": str(exc)}))
        finally:
            self.targets.pop(mid, None)
            if not ran:
                if launched:  # a copy that never ran (and may hang: see supervisor.state)
                    with contextlib.suppress(DwcpError):
                        await self.vms.quit(d.name, force=True)
                with contextlib.suppress(FileNotFoundError):
                    disk.unlink()
            chan.writer.close()

    async def _own(self, name: str) -> bool:
        own = self.ctx.ownership
        if own is None:
            return False
        with contextlib.suppress(DwcpError, TimeoutError):
            async with asyncio.timeout(30.0):
                return (await own.owner(name)).owner == self.ctx.key.public.node_id
        return False

    async def _loaded(self, qmp: QmpClient) -> str | None:
        """QEMU's state once the incoming stream is complete (bounded wait), else None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60.0
        while (st := (await qmp.execute("query-status")).get("status")) == "inmigrate":
            if loop.time() > deadline:
                return None
            await asyncio.sleep(POLL)
        return str(st) if st in ("paused", "prelaunch", "postmigrate") else None

    async def _run(self, qmp: QmpClient, d: VmDefinition, disk: Path) -> None:
        if await self._loaded(qmp) is None:
            raise VmError("the migration stream did not complete at the destination")
        with contextlib.suppress(QmpClosedError, VmError):
            await qmp.execute("nbd-server-stop")
        final = self.ctx.store.images_dir / d.disk
        await asyncio.to_thread(os.replace, disk, final)
        # in postcopy QEMU's main loop faults on pages that wait behind the background
        # stream on a slow link: cont took > 10 s at 2 MB/s (tests/vm/test_postcopy.py)
        await qmp.execute("cont", timeout=postcopy.CONT_SECONDS)
        self.vms.paths(d.name).incoming.unlink(missing_ok=True)
        log.info("VM %s arrived live and runs here", d.name, extra={"event": "live_in_ok"})
