"""ServiceSet: start in order, stop in reverse, roll back a failed start, one handler per name."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from dwcp.node.control import Emit, Handler
from dwcp.node.service import BaseService, ServiceSet


class Recorder(BaseService):
    def __init__(self, name: str, log: list[str], *, fail: bool = False, ops: tuple[str, ...] = ()):
        self.name = name  # type: ignore[misc]
        self.log, self.fail, self.ops = log, fail, ops

    def handlers(self) -> Mapping[str, Handler]:
        async def op(args: dict[str, Any], emit: Emit) -> Any:
            return self.name

        return dict.fromkeys(self.ops, op)

    async def start(self) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"start {self.name}")

    async def drain(self, deadline: float) -> None:
        self.log.append(f"drain {self.name}")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.name == "broken-stop":
            raise RuntimeError("cannot stop")


def test_order_and_rollback() -> None:
    async def main() -> None:
        log: list[str] = []
        s = ServiceSet()
        for n in ("a", "broken-stop", "c"):
            s.add(Recorder(n, log))
        with pytest.raises(ValueError):
            s.add(Recorder("a", log))
        await s.start()
        await s.drain(0.0)
        await s.stop()  # one failing stop does not keep the others running
        assert log == [
            "start a",
            "start broken-stop",
            "start c",
            "drain c",
            "drain broken-stop",
            "drain a",
            "stop c",
            "stop broken-stop",
            "stop a",
        ]
        log.clear()
        t = ServiceSet()
        for n, fail in (("x", False), ("y", True), ("z", False)):
            t.add(Recorder(n, log, fail=fail))
        with pytest.raises(RuntimeError, match="y cannot start"):
            await t.start()
        assert log == ["start x", "stop x"]

    asyncio.run(main())


def test_one_handler_per_operation() -> None:
    s = ServiceSet()
    s.add(Recorder("a", [], ops=("status", "jobs")))
    s.add(Recorder("b", [], ops=("gossip",)))
    assert sorted(s.handlers()) == ["gossip", "jobs", "status"]
    s.add(Recorder("c", [], ops=("jobs",)))
    with pytest.raises(ValueError, match="'jobs' is answered by both 'a' and 'c'"):
        s.handlers()
