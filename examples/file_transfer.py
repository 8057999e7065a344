"""A resumable file transfer over dwcp's striped bulk API.

    python examples/file_transfer.py [FILE]

``Session.send`` stripes one transfer across several QUIC connections and streams
(the count adapts to the path), for large transfers over long fat links. Resuming
is the application's part: the receiver appends what it consumed to its file, so
after a lost session the sender asks for the file's size (one ``request``) and sends
the rest with ``offset=`` that size. The demo sends half, drops the session, and
resumes on a new one; without FILE it sends 8 MiB of random data.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from dwcp.identity import NodeKey
from dwcp.transport import Session, connect, serve

CHUNK = 1 << 20


def chunks(path: Path, start: int, stop: int) -> list[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        return [f.read(min(CHUNK, stop - pos)) for pos in range(start, stop, CHUNK)]


async def main(src: Path, dst: Path) -> None:
    server_key, client_key = NodeKey.generate(), NodeKey.generate()

    async def receive(session: Session) -> None:
        bulk = await session.accept_bulk()
        with open(dst, "ab") as out:
            async for piece in bulk:  # in order, from the offset the sender resumed at
                out.write(piece)
                out.flush()

    async def on_request(session: Session, body: bytes) -> bytes:
        return str(dst.stat().st_size if dst.exists() else 0).encode()  # "how much do you have?"

    size = src.stat().st_size
    async with await serve(
        "127.0.0.1", 0, server_key, [client_key.public], receive, on_request=on_request
    ) as server:
        host, port = server.address
        # First attempt: only half gets through, then the session is lost.
        async with await connect(host, port, client_key, [server_key.public]) as session:
            await session.send(chunks(src, 0, size // 2))
        # Resume: ask how much arrived, send the rest from there.
        async with await connect(host, port, client_key, [server_key.public]) as session:
            have = int(await session.request(b"size?", timeout=30))
            print(f"resuming at {have} of {size} bytes")
            await session.send(chunks(src, have, size), offset=have)
            for _ in range(1000):  # the receiver may still be writing its last chunk
                if int(await session.request(b"size?", timeout=30)) >= size:
                    break
                await asyncio.sleep(0.01)
    same = hashlib.sha256(src.read_bytes()).digest() == hashlib.sha256(dst.read_bytes()).digest()
    print(f"{dst.name}: {size} bytes, {'identical' if same else 'DIFFERENT'}")
    assert same


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        if len(sys.argv) > 1:
            source = Path(sys.argv[1])
        else:
            source = Path(tmp) / "payload.bin"
            source.write_bytes(os.urandom(8 << 20))
        asyncio.run(main(source, Path(tmp) / "received.bin"))
