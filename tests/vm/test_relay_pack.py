"""The live relay's zstd framing: round trip, and a frame that lies about its size refused."""

from __future__ import annotations

import asyncio
import os

import zstandard

from dwcp import framing
from dwcp.live import relay


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False

    def write(self, b: bytes) -> None:
        self.data += b

    async def drain(self) -> None:
        return None

    def write_eof(self) -> None:
        self.eof = True


def reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


def test_pack_then_unpack_gives_the_bytes_back_and_counts_the_channel() -> None:
    payload = os.urandom(300_000) + bytes(700_000) + b"qemu" * 50_000

    async def main() -> None:
        packed, out = Sink(), Sink()
        sent, got = relay.Counter(), relay.Counter()
        # source side: QEMU's socket is a, the channel b
        await relay.pipe(reader(payload), Sink(), reader(b""), packed, sent, packed="b")
        assert packed.eof and sent.up == len(packed.data) < len(payload)
        # destination side: the channel is a, QEMU's socket b
        await relay.pipe(reader(bytes(packed.data)), Sink(), reader(b""), out, got, packed="a")
        assert bytes(out.data) == payload and out.eof and got.up == sent.up

    asyncio.run(main())


def test_a_frame_declaring_more_than_a_chunk_is_refused() -> None:
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(relay.CHUNK + 1))
    cut = framing.encode(zstandard.ZstdCompressor(level=1).compress(b"x" * 100))[:-3]

    async def main() -> None:
        for bad in (framing.encode(bomb), cut):
            out = Sink()
            await relay.pipe(reader(bad), Sink(), reader(b""), out, relay.Counter(), packed="a")
            assert out.data == b""  # refused, not decompressed; the relay just ends

    asyncio.run(main())
