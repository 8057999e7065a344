"""The ASS membership inside ``dwcp-node``: the sans-IO core on a UDP socket, thin.

Each datagram is opened by ``dwcp.gossip.auth`` (admitted sender, valid signature, fresh
counter) before the core sees it, and the core's answers go to the admitted address of
their destination, never to the datagram's source: a node that is not admitted, or that
spoofs an address, gets nothing. Timers are one ``call_at`` handle re-armed at the core's
next deadline. The incarnation is persisted (temp file, fsync, rename) so a restarted
node starts above every accusation made about its previous life.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dwcp.errors import ConfigError, PeerError, UsageError
from dwcp.gossip.admission import (
    Admission,
    AdmissionWatcher,
    AdmittedMember,
    add_node,
    load_admission,
    remove_node,
)
from dwcp.gossip.auth import Signer, Verifier
from dwcp.gossip.inventory import FINAL, REQUEST, RESPONSE, TAG, Inventory, decode_sync, encode_sync
from dwcp.gossip.messages import ALIVE, STATE_NAMES, decode, encode
from dwcp.gossip.records import SwimConfig
from dwcp.gossip.swim import Send, Swim
from dwcp.gossip.where_content import where_content
from dwcp.node.context import NodeContext
from dwcp.node.control import Emit, Handler
from dwcp.node.ownership import Ownership
from dwcp.node.service import BaseService
from dwcp.tasks import cancel_and_wait, log_failure

log = logging.getLogger("dwcp.node")


def read_incarnation(path: Path) -> int:
    try:
        return int(path.read_text(encoding="ascii").strip() or 0)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable incarnation ({exc}); remove the file") from exc


def write_incarnation(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{value}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: GossipService) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.owner.on_datagram(data)


class GossipService(BaseService):
    """Runs when the node's config directory holds a ``gossip.toml`` (see admission)."""

    name = "gossip"

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.admission: Admission | None = load_admission(ctx.config.path)
        self.core: Swim | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.malformed = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._addrs: dict[str, tuple[str, int]] = {}
        self._inc_path = ctx.config.data_dir / "gossip" / "incarnation"
        self._started = time.monotonic()
        self._persisted = 0
        self.inventory: Inventory | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._members: dict[str, AdmittedMember] = {}  # admitted now, this node included
        self.watcher: AdmissionWatcher | None = None
        self._watch: asyncio.Task[None] | None = None

    def handlers(self) -> Mapping[str, Handler]:
        return {
            "members": self.op_members,
            "where": self.op_where,
            "where_content": self.op_where_content,
            "add_node": self.op_add_node,
            "remove_node": self.op_remove_node,
        }

    async def start(self) -> None:
        adm = self.admission
        if adm is None:
            return
        me = adm.name_of(self.ctx.key.public)
        if me is None:
            raise ConfigError(
                f"this node's key {self.ctx.key.public.text} is not a member in gossip.toml; "
                "add it as a [[members]] table (name, key, address)"
            )
        inc = read_incarnation(self._inc_path) + 1
        write_incarnation(self._inc_path, inc)
        self._persisted = inc
        self._members = adm.by_name()
        self._addrs = {m.name: (m.address.host, m.address.port) for m in adm.members}
        self.signer = Signer(self.ctx.key, me)
        self.verifier = Verifier({m.name: m.key for m in adm.members})
        loop = asyncio.get_running_loop()
        p = adm.period
        cfg = SwimConfig(
            probe_interval=p, probe_timeout=p / 2, min_probe_timeout=p / 5, gossip_interval=p / 5
        )
        self.core = Swim(me, list(self._addrs), now=loop.time(), config=cfg, incarnation=inc)
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self), local_addr=(adm.listen.host, adm.listen.port)
        )
        log.info(
            "gossip: member %s on %s, incarnation %d, %d members admitted",
            me,
            adm.listen,
            inc,
            len(adm.members),
            extra={"event": "gossip_started", "incarnation": inc},
        )
        self.inventory = Inventory(me)
        self.ctx.stats.gossip = self.metrics
        self._rearm()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="gossip-inventory")
        self._refresher.add_done_callback(log_failure)  # a bug here is logged, not lost
        if self.ctx.ownership is not None:  # the registry's member table is authoritative
            self.watcher = AdmissionWatcher(self.ctx.ownership, adm.members, adm.poll, self._apply)
            self._watch = asyncio.create_task(self.watcher.run(), name="gossip-admission")
            self._watch.add_done_callback(log_failure)

    async def stop(self) -> None:
        if self._watch is not None:
            await cancel_and_wait(self._watch)
            self._watch = None
        if self._refresher is not None:
            await cancel_and_wait(self._refresher)
            self._refresher = None
        core, transport = self.core, self._transport
        if core is not None and transport is not None:
            self._emit(core.leave(asyncio.get_running_loop().time()))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if transport is not None:
            transport.close()
            self._transport = None

    def _apply(self, members: list[AdmittedMember], version: int) -> None:
        """Make ``members`` the admitted set: a new one is probed, a removed one is
        forgotten, told nothing, and its datagrams are dropped as not_admitted."""
        core = self.core
        assert core is not None
        by_name = {m.name: m for m in members}
        if core.name not in by_name:
            log.warning(
                "gossip: this node (%s) is not in the committed member table (version %d): "
                "it gossips with nobody until it is added again",
                core.name,
                version,
                extra={"event": "self_removed", "version": version},
            )
            by_name = {}
        added, gone = set(by_name) - set(self._members), set(self._members) - set(by_name)
        self._members = by_name
        self._addrs = {m.name: (m.address.host, m.address.port) for m in by_name.values()}
        self.verifier.set_keys({m.name: m.key for m in by_name.values()})
        core.set_admitted(by_name, asyncio.get_running_loop().time())
        log.info(
            "gossip: member table version %d: %d members admitted (added %s, removed %s)",
            version,
            len(by_name),
            ", ".join(sorted(added)) or "none",
            ", ".join(sorted(gone)) or "none",
            extra={"event": "admission_changed", "version": version},
        )
        self._rearm()

    # --- the loop: datagrams and one timer --------------------------------------------------

    def on_datagram(self, data: bytes) -> None:
        core = self.core
        if core is None:
            return
        self.bytes_received += len(data)
        try:
            sender, body = self.verifier.open(data)
        except PeerError:
            return  # counted by the verifier, never acted upon
        if body[:2] == TAG:
            self._on_sync(sender, body)
            return
        try:
            msg = decode(body)
        except PeerError:
            self.malformed += 1  # signed by a member but malformed: a bug or another version
            return
        now = asyncio.get_running_loop().time()
        self._emit(core.receive(sender, msg, now))
        self._after()

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        core = self.core
        if core is None:
            return
        self._emit(core.tick(asyncio.get_running_loop().time()))
        self._after()

    def _after(self) -> None:
        core = self.core
        assert core is not None
        for c in core.changes:
            log.info(
                "gossip: member %s is %s (incarnation %d, from %s)",
                c.name,
                STATE_NAMES[c.new],
                c.incarnation,
                c.by,
                extra={"event": "member_state", "member": c.name, "state": STATE_NAMES[c.new]},
            )
        core.changes.clear()
        if core.incarnation > self._persisted:
            write_incarnation(self._inc_path, core.incarnation)
            self._persisted = core.incarnation
        self._rearm()

    def _rearm(self) -> None:
        core = self.core
        if core is None:
            return
        at = core.next_deadline()
        if at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = asyncio.get_running_loop().call_at(at, self._on_timer)

    def _emit(self, sends: list[Send]) -> None:
        transport = self._transport
        if transport is None:
            return
        for dst, msg in sends:
            self._send_raw(dst, encode(msg))

    # --- inventories: local images published, push-pull with a random member each period ---

    async def _local_images(self) -> dict[str, str]:
        d = self.ctx.store.images_dir.resolve()

        def listing(ix: Any) -> dict[str, str]:
            ix.sync_dir(d)
            return {
                f"img/{r.path.name}": f"{r.size} {r.sha256 or ''}"
                for r in ix.images()
                if r.path.parent == d
            }

        got: dict[str, str] = await self.ctx.index.call(listing)
        return got

    async def _refresh_loop(self) -> None:
        assert self.admission is not None and self.inventory is not None and self.core is not None
        period = self.admission.period
        while True:
            try:
                changed = self.inventory.set_local(await self._local_images())
            except OSError as exc:  # the image directory is unreadable: keep gossiping
                log.warning("gossip: cannot list local images: %s", exc)
                changed = False
            alive = [n for n, m in self.core.members.items() if m.state == ALIVE]
            if alive:
                rng = self.core.rng
                for dst in rng.sample(alive, min(len(alive), 3 if changed else 1)):
                    self._send_raw(dst, encode_sync(self.inventory.digest(), [], REQUEST))
            await asyncio.sleep(period)

    def _on_sync(self, sender: str, body: bytes) -> None:
        inv = self.inventory
        if inv is None:
            return
        try:
            digest, deltas, leg = decode_sync(body)
        except PeerError:
            self.malformed += 1
            return
        if deltas:
            inv.apply(deltas, set(self._addrs))
        if leg == REQUEST:
            self._send_raw(sender, encode_sync(inv.digest(), inv.deltas_for(digest), RESPONSE))
        elif leg == RESPONSE:
            back = inv.deltas_for(digest)
            if back:
                self._send_raw(sender, encode_sync({}, back, FINAL))

    def _send_raw(self, dst: str, body: bytes) -> None:
        addr = self._addrs.get(dst)
        if addr is None or self._transport is None:
            return
        datagram = self.signer.seal(body)
        self.bytes_sent += len(datagram)
        self._transport.sendto(datagram, addr)

    async def op_where(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        image = str(args.get("image", ""))
        if self.inventory is None:
            return {"enabled": False, "image": image, "holders": []}
        holders = [h for h in self.inventory.where(image) if h["member"] in self._members]
        return {"enabled": True, "image": image, "holders": holders}

    async def op_where_content(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """``where PATH``: {size, piece, hashes} of a file the CLI hashed; rows per member."""
        if self.inventory is None or self.core is None:
            return {"enabled": False, "members": []}
        me = self.core.name
        rows = await where_content(self.ctx, self.inventory, self._members, me, args)
        return {"enabled": True, "members": rows}

    def metrics(self) -> dict[str, Any]:
        """What ``dwcp_gossip_*`` reports when the node is scraped."""
        core = self.core
        assert core is not None
        by_state = dict.fromkeys(STATE_NAMES, 0)
        for m in core.members.values():
            by_state[STATE_NAMES[m.state]] += 1
        by_state["alive"] += 1  # this node
        return {
            "members": by_state,
            "counters": dict(core.stats),
            "dropped": {**self.verifier.dropped, "malformed_body": self.malformed},
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }

    # --- control ----------------------------------------------------------------------------

    async def op_members(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        core, adm = self.core, self.admission
        if core is None or adm is None:
            return {"enabled": False, "members": []}
        now = asyncio.get_running_loop().time()
        rows = [
            {
                "name": core.name,
                "address": str(adm.listen),
                "state": STATE_NAMES[ALIVE],
                "incarnation": core.incarnation,
                "heard_s": 0.0,
                "self": True,
                "images": sorted(self.inventory.images(core.name)) if self.inventory else [],
            }
        ]
        by_name = self._members
        for name in sorted(core.members):
            m = core.members[name]
            rows.append(
                {
                    "name": name,
                    "address": str(by_name[name].address),
                    "state": STATE_NAMES[m.state],
                    "incarnation": m.inc,
                    "heard_s": None if m.heard is None else round(now - m.heard, 3),
                    "self": False,
                    "images": sorted(self.inventory.images(name)) if self.inventory else [],
                }
            )
        up = max(time.monotonic() - self._started, 1e-9)
        return {
            "enabled": True,
            "self": core.name,
            "members": rows,
            "stats": dict(core.stats),
            "dropped": {**self.verifier.dropped, "malformed_body": self.malformed},
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_sent_per_s": round(self.bytes_sent / up, 1),
            "awareness": core.awareness.score,
            "admission": {
                "source": "registry" if self.watcher and self.watcher.version else "gossip.toml",
                "version": self.watcher.version if self.watcher else 0,
            },
        }

    async def op_add_node(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        own = self._ownership()
        got = await add_node(
            own, self._members, str(args["name"]), str(args["key"]), str(args["address"])
        )
        if self.watcher is not None:
            self.watcher.nudge()
        return got

    async def op_remove_node(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        got = await remove_node(self._ownership(), self._members, str(args["name"]))
        if self.watcher is not None:
            self.watcher.nudge()
        return got

    def _ownership(self) -> Ownership:
        if self.ctx.ownership is None:
            raise UsageError(
                "this node has no [consensus] section: the fleet's member table lives in the "
                "PBFT registry; run the command on a member with [consensus]"
            )
        return self.ctx.ownership
