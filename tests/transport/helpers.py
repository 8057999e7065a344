"""Shared helpers for the transport tests: a guarded event-loop runner and node keys."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from dwcp.identity import NodeKey

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run ``coro`` on a fresh loop; the timeout only guards against hangs."""

    async def guarded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(guarded())


def two_keys() -> tuple[NodeKey, NodeKey]:
    return NodeKey.generate(), NodeKey.generate()
