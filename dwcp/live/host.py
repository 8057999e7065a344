"""What live migration needs of the node's VM supervisor (``dwcp.vm.supervisor``).

The supervisor owns the migrator; a protocol here keeps the import one-way.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dwcp.vm.definition import VmDefinition, VmPaths
from dwcp.vm.qmp import QmpClient

if TYPE_CHECKING:
    from dwcp.node.context import NodeContext


class VmHost(Protocol):
    ctx: NodeContext

    def paths(self, name: str) -> VmPaths: ...
    def lock(self, name: str) -> asyncio.Lock: ...
    async def attach(self, name: str) -> QmpClient: ...
    async def state(self, name: str) -> tuple[str, int | None]: ...
    async def launch(
        self, d: VmDefinition, incoming: str | None = None, disk_path: Path | None = None
    ) -> QmpClient: ...
    async def quit(self, name: str, *, force: bool = False) -> bool: ...
