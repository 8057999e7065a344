"""The asyncio glue with the real delta engine, over in-memory channels (no transport)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dwcp import migrate as aio
from dwcp.errors import ConnectionLostError, ImageError, RemoteError
from dwcp.identity import NodeKey
from dwcp.node.store import Store, check_image_name

MiB = 1 << 20


class MemChannel:
    """One end of an in-memory channel pair; ``cut_after`` messages, then the link dies."""

    def __init__(self, inbox: asyncio.Queue[bytes | None], outbox: asyncio.Queue[bytes | None]):
        self.inbox, self.outbox = inbox, outbox
        self.cut_after: int | None = None
        self.sent = 0
        self.tamper = False

    async def send(self, data: bytes) -> None:
        if self.cut_after is not None and self.sent >= self.cut_after:
            await self.outbox.put(None)
            raise ConnectionLostError("cut")
        self.sent += 1
        if self.tamper and len(data) > 100_000:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        await self.outbox.put(data)

    async def recv(self) -> bytes:
        data = await self.inbox.get()
        if data is None:
            raise ConnectionLostError("closed")
        return data

    async def close(self) -> None:
        await self.outbox.put(None)


class MemBulk(MemChannel):
    """Adds a bulk path (a second queue), as the transport offers."""

    def __init__(
        self,
        inbox: asyncio.Queue[bytes | None],
        outbox: asyncio.Queue[bytes | None],
        bin_: asyncio.Queue[bytes | None],
        bout: asyncio.Queue[bytes | None],
    ):
        super().__init__(inbox, outbox)
        self.bin, self.bout = bin_, bout

    async def send_frames(self, frames: AsyncIterator[bytes]) -> None:
        async for f in frames:
            await self.bout.put(f)

    async def recv_frames(self) -> AsyncIterator[bytes]:
        while (f := await self.bin.get()) is not None:
            yield f


def pair(bulk: bool) -> tuple[MemChannel, MemChannel]:
    a: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
    b: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
    if not bulk:
        return MemChannel(a, b), MemChannel(b, a)
    c: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
    d: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
    return MemBulk(a, b, c, d), MemBulk(b, a, d, c)


def make_image(path: Path, blocks: int, seed: int, zero_every: int = 5) -> bytes:
    parts = []
    for i in range(blocks):
        if i % zero_every == 0:
            parts.append(bytes(4096))
        else:
            parts.append(hashlib.sha256(f"{seed}-{i}".encode()).digest() * 128)
    data = b"".join(parts)
    path.write_bytes(data)
    return data


class Dest:
    def __init__(self, root: Path) -> None:
        self.store = Store(root)
        self.store.create()
        self.index = aio.IndexWorker(self.store.index_path)

    def hooks(self) -> aio.ReceiverHooks:
        return aio.ReceiverHooks(
            images_dir=self.store.images_dir,
            partial_dir=self.store.transfer_dir,
            check_name=check_image_name,
            index=self.index,
            max_image_bytes=1 << 34,
        )


async def migrate(
    src: Path,
    dest: Dest,
    key: NodeKey,
    *,
    bulk: bool = False,
    cut_after: int | None = None,
    tamper: bool = False,
    name: str = "vm.img",
) -> tuple[aio.MigrationResult | BaseException, object]:
    s, r = pair(bulk)
    s.cut_after = cut_after
    s.tamper = tamper
    send = aio.send_image(s, key, src, name=name, peer="b", level=1)
    recv = aio.receive_image(r, key.public, dest.hooks())
    res = await asyncio.gather(send, recv, return_exceptions=True)
    return res[0], res[1]  # type: ignore[return-value]


@pytest.mark.parametrize("bulk", [False, True])
def test_cold_then_warm_then_cross(tmp_path: Path, bulk: bool) -> None:
    async def main() -> None:
        key = NodeKey.generate()
        dest = Dest(tmp_path / "dest")
        await dest.index.open(dest.store.images_dir)
        v1 = make_image(tmp_path / "v1.img", 1024, 1)  # 4 MiB
        res, name = await migrate(tmp_path / "v1.img", dest, key, bulk=bulk)
        assert isinstance(res, aio.MigrationResult), res
        assert name == "vm.img"
        assert (dest.store.images_dir / "vm.img").read_bytes() == v1
        assert res.sha256 == hashlib.sha256(v1).hexdigest()
        assert res.bytes_missing < len(v1) and res.bytes_zero > 0
        # warm: a few blocks changed, same name (replaces the old version)
        v2 = bytearray(v1)
        for blk in (3, 400, 900):
            v2[blk * 4096 : blk * 4096 + 4096] = os.urandom(4096)
        (tmp_path / "v2.img").write_bytes(v2)
        res, _ = await migrate(tmp_path / "v2.img", dest, key, bulk=bulk)
        assert isinstance(res, aio.MigrationResult), res
        assert res.bytes_missing == 3 * 4096
        assert (dest.store.images_dir / "vm.img").read_bytes() == bytes(v2)
        # cross-image: another image made of v2's blocks, in another order, another name
        blocks = [bytes(v2[i * 4096 : (i + 1) * 4096]) for i in range(1024)]
        other = b"".join(reversed(blocks)) + os.urandom(4096)
        (tmp_path / "other.img").write_bytes(other)
        res, _ = await migrate(tmp_path / "other.img", dest, key, bulk=bulk, name="other.img")
        assert isinstance(res, aio.MigrationResult), res
        assert res.bytes_missing == 4096
        assert (dest.store.images_dir / "other.img").read_bytes() == other
        names = await dest.index.call(lambda ix: sorted(r.path.name for r in ix.images()))
        assert names == ["other.img", "vm.img"]
        await dest.index.close()

    asyncio.run(main())


def test_resume_after_cut(tmp_path: Path) -> None:
    async def main() -> None:
        key = NodeKey.generate()
        dest = Dest(tmp_path / "dest")
        await dest.index.open(dest.store.images_dir)
        data = os.urandom(6 * MiB)
        src = tmp_path / "v.img"
        src.write_bytes(data)
        res, got = await migrate(src, dest, key, cut_after=4)  # offer + 3 frames
        assert isinstance(res, ConnectionLostError) and got is None
        assert len(dest.store.partial_transfers()) == 1
        assert not (dest.store.images_dir / "vm.img").exists()
        res, _ = await migrate(src, dest, key)
        assert isinstance(res, aio.MigrationResult), res
        assert res.resumed and res.bytes_sent < res.bytes_missing
        assert hashlib.sha256((dest.store.images_dir / "vm.img").read_bytes()).digest() == (
            hashlib.sha256(data).digest()
        )
        assert dest.store.partial_transfers() == []
        await dest.index.close()

    asyncio.run(main())


def test_tampered_frames_rejected(tmp_path: Path) -> None:
    async def main() -> None:
        key = NodeKey.generate()
        dest = Dest(tmp_path / "dest")
        await dest.index.open(dest.store.images_dir)
        src = tmp_path / "v.img"
        src.write_bytes(os.urandom(3 * MiB))
        res, got = await migrate(src, dest, key, tamper=True)
        assert isinstance(res, RemoteError) and res.code in ("protocol", "integrity"), res
        assert got is None
        assert list(dest.store.images_dir.iterdir()) == []
        assert dest.store.partial_transfers() == []
        await dest.index.close()

    asyncio.run(main())


def test_untrusted_key_refused(tmp_path: Path) -> None:
    async def main() -> None:
        dest = Dest(tmp_path / "dest")
        await dest.index.open(dest.store.images_dir)
        src = tmp_path / "v.img"
        src.write_bytes(os.urandom(MiB))
        s, r = pair(False)
        send = aio.send_image(s, NodeKey.generate(), src, name="x", peer="b")
        recv = aio.receive_image(r, NodeKey.generate().public, dest.hooks())
        res = await asyncio.gather(send, recv, return_exceptions=True)
        assert isinstance(res[0], RemoteError) and res[0].code == "refused"
        await dest.index.close()

    asyncio.run(main())


def test_missing_image(tmp_path: Path) -> None:
    s, _ = pair(False)
    with pytest.raises(ImageError, match="not found"):
        asyncio.run(aio.send_image(s, NodeKey.generate(), tmp_path / "nope", name="x", peer="b"))
