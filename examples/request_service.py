"""An authenticated request/response service: a key-value store only trusted keys reach.

    python examples/request_service.py

Runs the server and a client on loopback in one process. Each side has an Ed25519
node key; each trusts only the other's public key, so a stranger's handshake fails
(``AuthenticationError``). ``session.request`` is one round trip; the server's
handler sees which key is asking (``session.peer``).
"""

from __future__ import annotations

import asyncio
import json

from dwcp.errors import RemoteError
from dwcp.identity import NodeKey
from dwcp.transport import Session, connect, serve


async def main() -> None:
    server_key, client_key = NodeKey.generate(), NodeKey.generate()
    store: dict[str, str] = {}

    async def on_request(session: Session, body: bytes) -> bytes:
        req = json.loads(body)
        if req["op"] == "put":
            store[req["key"]] = req["value"]
            return b'{"ok": true}'
        if req["op"] == "get":
            reply = {"value": store.get(req["key"]), "asked_by": session.peer.node_id}
            return json.dumps(reply).encode()
        raise ValueError(f"unknown op {req['op']!r}")  # the client gets a RemoteError

    async with await serve(
        "127.0.0.1", 0, server_key, [client_key.public], on_request=on_request
    ) as server:
        host, port = server.address
        async with await connect(host, port, client_key, [server_key.public]) as session:
            await session.request(b'{"op": "put", "key": "vm1", "value": "host-a"}', timeout=10)
            reply = json.loads(await session.request(b'{"op": "get", "key": "vm1"}', timeout=10))
            assert reply["value"] == "host-a" and reply["asked_by"] == client_key.node_id
            try:
                await session.request(b'{"op": "drop"}', timeout=10)
            except RemoteError as exc:
                print(f"refused as expected: {exc}")
    print(f"vm1 -> {reply['value']} (asked by {reply['asked_by']})")


if __name__ == "__main__":
    asyncio.run(main())
