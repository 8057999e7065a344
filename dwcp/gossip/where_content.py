"""``dwcp where PATH``: how much of a local file's content each member holds (issue 13).

The CLI hashes the file (``build_manifest`` at the pull's piece size) in its own process,
so the node's event loop never reads it, and sends the piece hashes. The node asks each
admitted member that the gossip inventory lists with images for their piece manifests at
that piece size, over the same authenticated peer sessions a pull uses
(``pull-manifest``), each member under one deadline: a member that does not answer is
reported ``unreachable``, never waited on. Per member it counts the bytes of the file's
pieces whose hash appears in any of that member's manifests (content at any piece-aligned
offset of any image; each of the file's pieces counted once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dwcp.errors import DwcpError, RemoteError, UsageError
from dwcp.gossip.admission import AdmittedMember
from dwcp.gossip.inventory import Inventory
from dwcp.migrate.multi import PieceManifest, build_manifest
from dwcp.node.context import NodeContext
from dwcp.node.pulls import SessionFetcher

ASK_TIMEOUT = 10.0  # one member's manifests, all of them: past it the member is unreachable


def file_pieces(m: PieceManifest) -> list[tuple[str, int]]:
    """(hash, size) of each of the manifest's pieces (the last one may be short)."""
    return [(h, min(m.piece, m.size - i * m.piece)) for i, h in enumerate(m.hashes)]


def held(
    pieces: Sequence[tuple[str, int]], manifests: Mapping[str, Iterable[str]]
) -> tuple[int, list[str]]:
    """Bytes of ``pieces`` whose hash is in any of ``manifests`` (image -> piece hashes),
    each piece once, and the images that share at least one piece with the file."""
    sets = {name: set(hashes) for name, hashes in manifests.items()}
    have: set[str] = set().union(*sets.values()) if sets else set()
    total = sum(size for h, size in pieces if h in have)
    wanted = {h for h, _ in pieces}
    return total, sorted(name for name, s in sets.items() if s & wanted)


def member_row(
    member: str, size: int, pieces: Sequence[tuple[str, int]], manifests: Mapping[str, Any]
) -> dict[str, Any]:
    """One output row of a member that answered."""
    got, images = held(pieces, manifests)
    share = round(got / size, 4) if size else 0.0
    return {"member": member, "bytes": got, "share": share, "images": images, "state": "ok"}


def unreachable(member: str, reason: str) -> dict[str, Any]:
    return {
        "member": member,
        "bytes": 0,
        "share": 0.0,
        "images": [],
        "state": "unreachable",
        "reason": reason,
    }


def parse_request(args: Mapping[str, Any]) -> tuple[int, int, list[tuple[str, int]]]:
    """(size, piece, pieces) from the control request, checked."""
    try:
        size, piece = int(args["size"]), int(args["piece"])
        hashes = [str(h) for h in args["hashes"]]
    except (KeyError, TypeError, ValueError):
        raise UsageError("where_content: expected size, piece and hashes") from None
    if piece <= 0 or size < 0 or len(hashes) != -(-size // piece):
        raise UsageError("where_content: hashes do not cover size in pieces of piece bytes")
    m = PieceManifest(str(args.get("name", "")), size, "", piece, tuple(hashes))
    return size, piece, file_pieces(m)


async def _own(ctx: NodeContext, images: Iterable[str], piece: int) -> dict[str, list[str]]:
    """This node's own images' piece hashes (hashed in a thread, not on the loop)."""
    out: dict[str, list[str]] = {}
    for name in images:
        try:
            path = ctx.store.image_path(name)
            m = await asyncio.to_thread(build_manifest, path, name, piece)
        except (DwcpError, OSError):
            continue  # gone or renamed since the inventory listed it
        if m.piece == piece:
            out[name] = list(m.hashes)
    return out


async def _ask(
    ctx: NodeContext, member: AdmittedMember, images: Iterable[str], piece: int
) -> dict[str, list[str]]:
    """The member's manifests of ``images`` over a peer session (no deadline here)."""
    peer = ctx.config.peer_by_key(member.key.raw)
    if peer is None:
        raise UsageError(
            f"no [[peers]] entry has {member.name}'s key; add it with 'dwcp peers add'"
        )
    fetcher = SessionFetcher(ctx, {member.name: peer})
    out: dict[str, list[str]] = {}
    try:
        for name in images:
            try:
                raw = await fetcher.manifest(member.name, name, piece)
            except RemoteError:
                continue  # it answered: it no longer has that image
            m = PieceManifest.from_json(raw)
            if m.piece == piece:  # a huge image's pieces are larger: not comparable
                out[name] = list(m.hashes)
    finally:
        fetcher.close()
    return out


async def where_content(
    ctx: NodeContext,
    inventory: Inventory,
    members: Mapping[str, AdmittedMember],
    me: str,
    args: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """A row per admitted member: bytes of the file it holds, share, images matched."""
    size, piece, pieces = parse_request(args)
    await ctx.reload()

    async def one(name: str) -> dict[str, Any]:
        images = sorted(inventory.images(name))
        if not images:
            return member_row(name, size, pieces, {})
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                if name == me:
                    got = await _own(ctx, images, piece)
                else:
                    got = await _ask(ctx, members[name], images, piece)
        except TimeoutError:
            return unreachable(name, f"no answer within {ASK_TIMEOUT:.0f} s")
        except (DwcpError, OSError) as exc:
            return unreachable(name, str(exc))
        return member_row(name, size, pieces, got)

    return list(await asyncio.gather(*(one(n) for n in sorted(members))))


__all__ = ["ASK_TIMEOUT", "file_pieces", "held", "member_row", "where_content"]
