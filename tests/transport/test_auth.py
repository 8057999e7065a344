"""Mutual authentication: only trusted keys, both sides with certificates, same ALPN."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dwcp.errors import AuthenticationError
from dwcp.identity import NodeKey
from dwcp.transport import api
from dwcp.transport.config import TransportConfig

from .helpers import run, two_keys

FAST = TransportConfig(connect_timeout=5.0, idle_timeout=5.0)


async def _attempt(
    server_key: NodeKey,
    server_trusts: NodeKey,
    client_key: NodeKey,
    client_trusts: NodeKey,
    client_config: TransportConfig = FAST,
) -> tuple[Any, list[Any]]:
    seen: list[Any] = []

    async def handler(session: Any) -> None:
        seen.append(session.peer)

    server = await api.serve(
        "127.0.0.1", 0, server_key, [server_trusts.public], handler, config=FAST
    )
    try:
        host, port = server.address
        session = await api.connect(
            host, port, client_key, [client_trusts.public], config=client_config
        )
        peer = session.peer
        await session.close()
        return peer, seen
    finally:
        server.close()
        await server.wait_closed()


def test_trusted_pair_connects_and_learns_the_peer_key() -> None:
    a, b = two_keys()
    peer, seen = run(_attempt(a, b, b, a))
    assert peer == a.public
    assert seen == [b.public]


def test_server_refuses_an_unknown_client_key() -> None:
    a, b = two_keys()
    stranger = NodeKey.generate()
    with pytest.raises(AuthenticationError):
        run(_attempt(a, b, stranger, a))


def test_client_refuses_an_unknown_server_key() -> None:
    a, b = two_keys()
    with pytest.raises(AuthenticationError):
        run(_attempt(a, b, b, NodeKey.generate()))


def test_missing_client_certificate_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two_keys()
    original = api.quic_configuration

    def no_client_cert(key: NodeKey, config: TransportConfig, *, is_client: bool) -> Any:
        conf = original(key, config, is_client=is_client)
        if is_client:
            conf.certificate = None
            conf.private_key = None
        return conf

    monkeypatch.setattr(api, "quic_configuration", no_client_cert)
    with pytest.raises(AuthenticationError):
        run(_attempt(a, b, b, a))


def test_wrong_alpn_is_refused() -> None:
    a, b = two_keys()
    with pytest.raises(AuthenticationError):
        run(_attempt(a, b, b, a, dataclasses.replace(FAST, alpn="dwcp/2")))
