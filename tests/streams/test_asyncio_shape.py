"""``dwcp.open_connection`` / ``dwcp.start_server`` used exactly as asyncio's (issue 18):
the same test bodies run against ``asyncio`` and ``dwcp``, a fixture swapping the module
(and supplying the keys and the way to read the bound port, where they differ)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import dwcp
from dwcp.identity import NodeKey


@dataclass
class Flavour:
    module: Any  # asyncio or dwcp
    server_kw: dict[str, Any]
    client_kw: dict[str, Any]
    port_of: Callable[[Any], int]


def _asyncio() -> Flavour:
    return Flavour(asyncio, {}, {}, lambda s: int(s.sockets[0].getsockname()[1]))


def _dwcp() -> Flavour:
    server, client = NodeKey.generate(), NodeKey.generate()
    return Flavour(
        dwcp,
        {"key": server, "trusted": [client.public]},
        {"key": client, "trusted": [server.public]},
        lambda s: int(s.address[1]),
    )


@pytest.fixture(params=["asyncio", "dwcp"])
def flavour(request: pytest.FixtureRequest) -> Flavour:
    return _asyncio() if request.param == "asyncio" else _dwcp()


async def _echo_upper(reader: Any, writer: Any) -> None:
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.write_eof()
    await writer.drain()


def test_echo_lines_readexactly_and_eof(flavour: Flavour) -> None:
    m = flavour

    async def main() -> None:
        server = await m.module.start_server(_echo_upper, "127.0.0.1", 0, **m.server_kw)
        async with server:
            reader, writer = await m.module.open_connection(
                "127.0.0.1", m.port_of(server), **m.client_kw
            )
            writer.write(b"hello\n")
            await writer.drain()
            assert await reader.readline() == b"HELLO\n"
            writer.writelines([b"abc", b"def\n"])
            await writer.drain()
            assert await reader.readexactly(4) == b"ABCD"
            assert await reader.readuntil(b"\n") == b"EF\n"
            big = b"x" * 60_000 + b"\n"  # under asyncio's 64 KiB line limit
            writer.write(big)
            await writer.drain()
            assert await reader.readexactly(len(big)) == big.upper()
            assert writer.can_write_eof()
            writer.write_eof()
            assert await reader.read() == b""  # the server's EOF follows ours
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())


def test_cancelling_a_pending_read_leaves_the_stream_usable(flavour: Flavour) -> None:
    m = flavour

    async def main() -> None:
        server = await m.module.start_server(_echo_upper, "127.0.0.1", 0, **m.server_kw)
        async with server:
            reader, writer = await m.module.open_connection(
                "127.0.0.1", m.port_of(server), **m.client_kw
            )
            pending = asyncio.ensure_future(reader.readline())
            await asyncio.sleep(0)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await reader.read(10)
            writer.write(b"still here\n")
            await writer.drain()
            assert await reader.readline() == b"STILL HERE\n"
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())


def test_peer_key_is_in_the_extra_info() -> None:
    m = _dwcp()
    seen: list[Any] = []

    async def handler(reader: Any, writer: Any) -> None:
        seen.append(writer.get_extra_info("peer_key"))
        writer.close()

    async def main() -> None:
        async with await dwcp.start_server(handler, "127.0.0.1", 0, **m.server_kw) as server:
            reader, writer = await dwcp.open_connection(
                "127.0.0.1", m.port_of(server), **m.client_kw
            )
            assert writer.get_extra_info("peer_key") == m.server_kw["key"].public
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())
    assert seen == [m.client_kw["key"].public]


def test_an_untrusted_client_is_refused() -> None:
    m = _dwcp()
    stranger = NodeKey.generate()

    async def main() -> None:
        async with await dwcp.start_server(_echo_upper, "127.0.0.1", 0, **m.server_kw) as server:
            with pytest.raises(dwcp.errors.AuthenticationError):
                await dwcp.open_connection(
                    "127.0.0.1",
                    m.port_of(server),
                    key=stranger,
                    trusted=m.client_kw["trusted"],
                )

    asyncio.run(main())
