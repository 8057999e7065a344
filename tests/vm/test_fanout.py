"""The live relay's N-connection mapping, without QEMU: QEMU's connections (main, then
multifd) are re-made at the destination in the source's accept order, whatever order
their channels arrive in, each with its own bytes both ways (QEMU 7.2 takes the first
connection it accepts as the main one)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from dwcp.errors import VmError
from dwcp.live import fanout
from dwcp.live.relay import Counter

N = 5  # main + multifd 4


def test_lanes_put_the_main_channel_on_the_primary_and_spread_the_rest() -> None:
    assert [fanout.lane_of(s, 5) for s in range(5)] == [0, 1, 2, 3, 4]
    assert [fanout.lane_of(s, 3) for s in range(6)] == [0, 1, 2, 1, 2, 1]
    assert [fanout.lane_of(s, 1) for s in range(4)] == [0, 0, 0, 0]


def test_connections_are_made_in_accept_order_when_channels_arrive_reversed(
    tmp_path: Path,
) -> None:
    src_sock, dst_sock = str(tmp_path / "relay.sock"), str(tmp_path / "qemu.sock")
    accepted: list[int] = []

    async def fake_destination_qemu(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()  # b"conn i\n": which source connection this one carries
        i = int(line.split()[1])
        accepted.append(i)
        w.write(b"ack %d\n" % i)
        w.write(await r.readexactly(100_000))  # the rest echoed back, through the relay
        await w.drain()
        w.close()

    async def main() -> None:
        turns = fanout.Turns()
        inbound: list[asyncio.Task[None]] = []

        async def opener(seq: int) -> tuple[Any, Any]:
            a, b = socket.socketpair()
            src = await asyncio.open_connection(sock=a)
            dst_r, dst_w = await asyncio.open_connection(sock=b)

            async def arrive() -> None:  # the main channel's arrives last
                await asyncio.sleep(0.05 * (N - seq))
                await fanout.relay_in(dst_r, dst_w, turns, seq,
                                      lambda: asyncio.open_unix_connection(dst_sock))  # fmt: skip

            inbound.append(asyncio.create_task(arrive()))
            return src

        relays: list[Any] = []
        dst = await asyncio.start_unix_server(fake_destination_qemu, path=dst_sock)
        out = await asyncio.start_unix_server(
            fanout.Fanout(opener, Counter(), relays), path=src_sock
        )
        conns = []
        for i in range(N):  # the source QEMU: main first, then the multifd connections
            r, w = await asyncio.open_unix_connection(src_sock)
            w.write(b"conn %d\n" % i + bytes([i]) * 100_000)
            conns.append((r, w))
        async with asyncio.timeout(15):
            for i, (r, w) in enumerate(conns):
                assert await r.readline() == b"ack %d\n" % i
                assert await r.readexactly(100_000) == bytes([i]) * 100_000
                w.close()
            await asyncio.gather(*inbound)
        out.close()
        dst.close()
        assert out.sockets == ()

    asyncio.run(main())
    assert accepted == list(range(N))


def test_a_connection_whose_predecessor_never_comes_fails_with_a_deadline() -> None:
    async def main() -> None:
        turns = fanout.Turns()
        await turns.done(0)
        await turns.wait(1, timeout=0.01)  # 0 is connected: 1 may go
        with pytest.raises(VmError, match="waited"):
            await turns.wait(3, timeout=0.05)

    asyncio.run(main())
