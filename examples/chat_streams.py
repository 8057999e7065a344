"""A chat over asyncio-shaped streams: ``dwcp.start_server`` / ``dwcp.open_connection``.

    python examples/chat_streams.py

The same code you would write with ``asyncio.start_server``: the server relays
every line a client sends to every other client. Two clients join on loopback, talk,
and leave. ``writer.get_extra_info("peer_key")`` names who is speaking.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dwcp
from dwcp.identity import NodeKey


async def main() -> None:
    server_key = NodeKey.generate()
    alice, bob = NodeKey.generate(), NodeKey.generate()
    names = {alice.public: "alice", bob.public: "bob"}
    clients: set[Any] = set()

    async def relay(reader: Any, writer: Any) -> None:
        who = names[writer.get_extra_info("peer_key")]
        clients.add(writer)
        try:
            async for line in reader:
                for other in clients - {writer}:
                    other.write(f"{who}: ".encode() + line)
                    await other.drain()
        finally:
            clients.discard(writer)
            writer.close()

    trusted = [alice.public, bob.public]
    async with await dwcp.start_server(
        relay, "127.0.0.1", 0, key=server_key, trusted=trusted
    ) as srv:
        port = srv.address[1]
        ra, wa = await dwcp.open_connection(
            "127.0.0.1", port, key=alice, trusted=[server_key.public]
        )
        rb, wb = await dwcp.open_connection("127.0.0.1", port, key=bob, trusted=[server_key.public])
        for _ in range(1000):  # until both joined
            if len(clients) == 2:
                break
            await asyncio.sleep(0.01)
        wa.write(b"hi bob\n")
        await wa.drain()
        heard = await asyncio.wait_for(rb.readline(), 10)
        wb.write(b"hi alice\n")
        await wb.drain()
        answer = await asyncio.wait_for(ra.readline(), 10)
        print(heard.decode().strip())
        print(answer.decode().strip())
        assert heard == b"alice: hi bob\n" and answer == b"bob: hi alice\n"
        for w in (wa, wb):
            w.close()
            await w.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
