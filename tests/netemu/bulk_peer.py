"""One end of a bulk transfer over dwcp.transport, run inside a link emulator namespace.

    python bulk_peer.py server HOST PORT KEY TRUST_PUB   # prints "ready", then a JSON result
    python bulk_peer.py client HOST PORT KEY TRUST_PUB TOTAL_BYTES RATE_BPS RTT_S

Both print {"bytes": N, "digest": xxh3-128 hex} of what they sent / received.
The data cycles 16 random 1 MiB blocks, each stamped with its index so a
misplaced or duplicated block changes the digest.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator

import xxhash

from dwcp.identity import NodeKey, PublicKey
from dwcp.transport import Session, TransportConfig, connect, run, serve

BLOCK = 1 << 20


def _blocks(total: int) -> Iterator[bytes]:
    pool = [os.urandom(BLOCK) for _ in range(16)]
    for i in range((total + BLOCK - 1) // BLOCK):
        yield i.to_bytes(8, "big") + pool[i % 16][8:]


async def server(host: str, port: int, key: NodeKey, trusted: PublicKey) -> None:
    done: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

    async def handler(session: Session) -> None:
        receiver = await session.accept_bulk()
        h = xxhash.xxh3_128()
        n = 0
        async for chunk in receiver:
            h.update(chunk)
            n += len(chunk)
        if not done.done():
            done.set_result({"bytes": n, "digest": h.hexdigest()})

    srv = await serve(host, port, key, [trusted], handler)
    print("ready", flush=True)
    result = await done
    print(json.dumps(result), flush=True)
    await asyncio.sleep(1.0)  # let the final acknowledgement reach the sender
    srv.close()
    await srv.wait_closed()


async def client(
    host: str, port: int, key: NodeKey, trusted: PublicKey, total: int, rate: float, rtt: float
) -> None:
    config = TransportConfig(bandwidth_bps=rate, rtt=rtt)
    session = await connect(host, port, key, [trusted], config=config)
    h = xxhash.xxh3_128()
    start = time.monotonic()
    sender = session.open_bulk()
    sent = 0
    for block in _blocks(total):
        buf = block[: total - sent]
        h.update(buf)
        await sender.write(buf)
        sent += len(buf)
    end = await sender.finish()
    secs = time.monotonic() - start
    await session.close()
    print(json.dumps({"bytes": end, "digest": h.hexdigest(), "seconds": secs}), flush=True)


def main(argv: list[str]) -> None:
    role, host, port = argv[0], argv[1], int(argv[2])
    key, trusted = NodeKey.load(argv[3]), PublicKey.parse(argv[4])
    if role == "server":
        run(server(host, port, key, trusted))
    else:
        run(client(host, port, key, trusted, int(argv[5]), float(argv[6]), float(argv[7])))


if __name__ == "__main__":
    main(sys.argv[1:])
