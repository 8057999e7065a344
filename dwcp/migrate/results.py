"""What a migration reports: ``Progress`` while it runs (the CLI's bar, ``dwcp jobs``)
and ``MigrationResult`` when it ends (``--json``); plain data, shared by the source, the
node and the CLI without importing the sending machinery."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Progress:
    """What a progress bar shows; sent to the CLI while a migration runs."""

    name: str
    peer: str
    bytes_image: int = 0
    bytes_missing: int = 0  # what the destination lacked (whole image)
    bytes_to_send: int = 0  # still lacking at the start of this run (less after a resume)
    bytes_sent: int = 0  # image bytes sent so far (uncompressed)
    bytes_wire: int = 0  # bytes put on the channel so far
    phase: str = "scanning"

    @property
    def dedup_ratio(self) -> float:
        """Fraction of the image the destination did not need (zeros and local data)."""
        if not self.bytes_image:
            return 0.0
        return 1.0 - self.bytes_missing / self.bytes_image


@dataclass
class MigrationResult:
    name: str
    peer: str
    sha256: str
    bytes_image: int
    bytes_missing: int
    bytes_local: int
    bytes_zero: int
    bytes_sent: int  # image bytes sent in this run (uncompressed)
    bytes_wire: int  # bytes this run put on the channel (frames and messages)
    seconds: float
    dedup_ratio: float
    resumed: bool
    owner: str | None = None  # with consensus: the VM's owner node id after the commit
    epoch: int | None = None  # ... and its epoch (fencing token)
    bytes_to_send: int = 0  # what the plan said this run sends (after a resume: the rest)
    dry_run: bool = False  # planned only: nothing sent, nothing stored (``dry_run=True``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
