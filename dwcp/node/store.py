"""The node's data directory: one place for everything a node keeps on disk.

Layout (created mode 0700 by ``dwcp init``)::

    DATA/images/          stored images (received or placed there); all are indexed
    DATA/index.db         the image index (sqlite, see dwcp.delta.ImageIndex)
    DATA/partial/ID/      an unfinished incoming transfer (Rebuilder state + temp file)
    DATA/logs/node.log    structured log (JSON lines)
    DATA/origins/NAME     where a received image came from (sender, source file, sha256)
    DATA/control.sock     the CLI's control socket while the node runs

``partial/`` lives on the same file system as ``images/`` so that finishing a
transfer is an atomic rename, and a transfer that stopped for any reason
(SIGTERM, crash, lost link) resumes from what ``partial/ID`` holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from dwcp.errors import UsageError

IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+~-]{0,199}$")
TRANSFER_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def check_image_name(name: str) -> str:
    """Return ``name`` if it is a safe file name for ``images/`` (no path, no leading dot)."""
    if not IMAGE_NAME_RE.match(name):
        raise UsageError(
            f"image name {name!r}: expected 1-200 letters, digits, '.', '_', '+', '~' or '-', "
            "not starting with '.' or '-'"
        )
    return name


@dataclass(frozen=True)
class Store:
    """Paths of one node's data directory."""

    root: Path

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def partial_dir(self) -> Path:
        return self.root / "partial"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def origins_dir(self) -> Path:
        return self.root / "origins"

    @property
    def index_path(self) -> Path:
        return self.root / "index.db"

    @property
    def log_path(self) -> Path:
        return self.logs_dir / "node.log"

    def create(self) -> None:
        """Create the layout (idempotent); directories are private to the node's user."""
        for d in (self.root, self.images_dir, self.partial_dir, self.logs_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def check(self) -> None:
        """Raise ``UsageError`` if the layout is missing (the node was not initialised)."""
        for d in (self.images_dir, self.partial_dir, self.logs_dir):
            if not d.is_dir():
                raise UsageError(f"data directory {self.root} lacks {d.name}/; run 'dwcp init'")

    def image_path(self, name: str) -> Path:
        return self.images_dir / check_image_name(name)

    def image_files(self) -> list[Path]:
        """Regular files in ``images/`` (hidden temp files excluded), sorted by name."""
        out = []
        for entry in os.scandir(self.images_dir):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            out.append(Path(entry.path))
        return sorted(out)

    def record_origin(self, name: str, origin: dict[str, str]) -> None:
        """Remember where the image stored as ``name`` came from (written atomically)."""
        self.origins_dir.mkdir(mode=0o700, exist_ok=True)
        path = self.origins_dir / check_image_name(name)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(origin, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)

    def origin(self, name: str) -> dict[str, str] | None:
        """Where the image stored as ``name`` came from, if this node received it."""
        try:
            data = json.loads((self.origins_dir / check_image_name(name)).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def backup_name(self, name: str) -> str:
        """The first free ``NAME.~N~`` in ``images/`` (cp --backup=numbered's naming)."""
        n = 1
        while (self.images_dir / f"{name}.~{n}~").exists():
            n += 1
        return check_image_name(f"{name}.~{n}~")

    def transfer_dir(self, transfer_id: str) -> Path:
        if not TRANSFER_ID_RE.match(transfer_id):
            raise UsageError(f"bad transfer id {transfer_id!r}")
        return self.partial_dir / transfer_id

    def partial_transfers(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.partial_dir) if TRANSFER_ID_RE.match(e.name))

    def drop_transfer(self, transfer_id: str) -> None:
        shutil.rmtree(self.transfer_dir(transfer_id), ignore_errors=True)

    def drop_stale_transfers(self, max_age_seconds: float, now: float) -> list[str]:
        """Remove partial transfers untouched for ``max_age_seconds`` (their sender gave up)."""
        dropped = []
        for tid in self.partial_transfers():
            d = self.transfer_dir(tid)
            try:
                newest = max([d.stat().st_mtime] + [e.stat().st_mtime for e in os.scandir(d)])
            except OSError:
                continue
            if now - newest > max_age_seconds:
                self.drop_transfer(tid)
                dropped.append(tid)
        return dropped
