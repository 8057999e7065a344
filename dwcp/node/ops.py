"""The node's own control operations (status, images, peers, owner, reload); its
Prometheus endpoint is ``dwcp.node.metrics_http``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from dwcp import __version__, delta
from dwcp.errors import UsageError
from dwcp.node.context import NodeContext
from dwcp.node.control import Emit, Handler
from dwcp.node.service import BaseService
from dwcp.node.store import check_image_name


class NodeOps(BaseService):
    name = "ops"

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def handlers(self) -> Mapping[str, Handler]:
        return {
            "status": self.op_status,
            "images": self.op_images,
            "peers": self.op_peers,
            "owner": self.op_owner,
            "reload": self.op_reload,
        }

    async def op_status(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        ctx = self.ctx
        images = await ctx.index.call(lambda ix: len(ix.images()))
        c = ctx.config
        return {
            "name": c.name,
            "node_id": ctx.key.node_id,
            "public_key": ctx.key.public.text,
            "listen": str(c.listen),
            "version": __version__,
            "uptime_seconds": round(time.time() - ctx.started, 1),
            "data_dir": str(c.data_dir),
            "images": images,
            "partial_transfers": ctx.store.partial_transfers(),
            "peers": [p.name for p in c.peers],
            "stats": ctx.stats.snapshot(),
            "consensus": ctx.ownership.status() if ctx.ownership is not None else None,
            "draining": ctx.draining,
        }

    async def op_images(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        d = self.ctx.store.images_dir.resolve()

        def listing(ix: delta.ImageIndex) -> list[dict[str, Any]]:
            ix.sync_dir(d)
            return [
                {"name": r.path.name, "size": r.size, "sha256": r.sha256, "mtime_ns": r.mtime_ns}
                for r in ix.images()
                if r.path.parent == d
            ]

        return await self.ctx.index.call(listing)

    async def op_peers(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        await self.ctx.reload()
        peers = self.ctx.config.peers
        probes = await asyncio.gather(*(self.ctx.sessions.probe(p) for p in peers))
        return [
            {
                "name": p.name,
                "address": str(p.address),
                "public_key": p.public_key.text,
                "node_id": p.public_key.node_id,
                "reachable": rtt is not None,
                "connect_seconds": None if rtt is None else round(rtt, 4),
            }
            for p, rtt in zip(peers, probes, strict=True)
        ]

    async def op_owner(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        own = self.ctx.ownership
        if own is None:
            raise UsageError("this node has no [consensus] section: VM ownership is not tracked")
        vm = check_image_name(str(args.get("vm", "")))
        got = await own.owner(vm)
        owner = got.owner or None
        cfg = self.ctx.config
        peer = next((p.name for p in cfg.peers if p.public_key.node_id == owner), None)
        if owner is not None and owner == own.me:
            peer = cfg.name
        return {"vm": vm, "owner": owner, "owner_name": peer, "epoch": got.epoch}

    async def op_reload(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        await self.ctx.reload()
        return {"peers": [p.name for p in self.ctx.config.peers]}
