"""The node's log: JSON lines in ``DATA/logs/node.log``, one short line per record on stderr."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, ClassVar

from dwcp.node.store import Store


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _skip: ClassVar[set[str]] = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._skip and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(store: Store, level: str) -> None:
    root = logging.getLogger("dwcp")
    root.setLevel(level.upper())
    root.handlers.clear()
    fh = logging.FileHandler(store.log_path, encoding="utf-8")
    fh.setFormatter(JsonFormatter())
    root.addHandler(fh)
    eh = logging.StreamHandler(sys.stderr)
    eh.setFormatter(logging.Formatter("dwcp-node: %(message)s"))
    root.addHandler(eh)
    root.propagate = False
