"""The aioquic internals dwcp.transport.quic relies on are still there, with the same shape.

If this fails after an aioquic upgrade, adapt ``dwcp/transport/quic.py`` (the only
module touching aioquic's private members) before widening the pin in pyproject.
"""

from __future__ import annotations

import pytest

from dwcp.identity import NodeKey
from dwcp.transport import quic
from dwcp.transport.tls import make_configuration


def test_every_aioquic_private_dwcp_uses_is_unchanged() -> None:
    config = make_configuration(NodeKey.generate(), is_client=True)
    problems = quic.check_aioquic(config)
    assert problems == [], "aioquic changed under dwcp.transport.quic:\n" + "\n".join(problems)


def test_the_check_notices_a_missing_private(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quic, "PRIVATES", (*quic.PRIVATES, ("sender", "_no_such_member", None)))
    config = make_configuration(NodeKey.generate(), is_client=True)
    assert quic.check_aioquic(config) == ["sender._no_such_member is gone"]
