"""The replica's message log: one entry per (view, sequence number), and checkpoint state."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

from dwcp.consensus.messages import PreparedProof, PrePrepare
from dwcp.errors import ProtocolError


@dataclass(slots=True)
class Entry:
    """Votes for one (view, seq); each replica's first vote is kept, later ones are ignored."""

    view: int
    seq: int
    pp: PrePrepare | None = None
    pp_raw: bytes = b""
    prepares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    commits: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    prepared: bool = False
    committed: bool = False
    commit_sent: bool = False
    resent_at: float = -1e300

    def matching(self, votes: dict[int, tuple[bytes, bytes]]) -> list[bytes]:
        d = self.pp.digest if self.pp is not None else None
        return [raw for dg, raw in votes.values() if dg == d]

    def cert(self, primary: int, need: int) -> PreparedProof:
        assert self.pp is not None
        raws = [raw for s, (dg, raw) in sorted(self.prepares.items()) if dg == self.pp.digest]
        return PreparedProof(self.pp_raw, tuple(raws[:need]))

    def records(self) -> list[bytes]:
        out = [self.pp_raw] if self.pp_raw else []
        out.extend(raw for _, raw in self.prepares.values())
        out.extend(raw for _, raw in self.commits.values())
        return out


@dataclass(slots=True)
class CommittedBatch:
    """A batch committed locally and waiting (or not) for execution in sequence order."""

    view: int
    pp: PrePrepare
    records: list[bytes]


def encode_state(app_snapshot: bytes, clients: dict[int, tuple[int, bytes]]) -> bytes:
    """Checkpoint blob: application snapshot plus the reply cache (for at-most-once)."""
    table = [[c, ts, res] for c, (ts, res) in sorted(clients.items())]
    return msgpack.packb([app_snapshot, table], use_bin_type=True)


def decode_state(blob: bytes, n_clients: int) -> tuple[bytes, dict[int, tuple[int, bytes]]]:
    try:
        app, table = msgpack.unpackb(blob, use_list=False, raw=False)
    except Exception as exc:
        raise ProtocolError(f"checkpoint state undecodable: {type(exc).__name__}") from exc
    if type(app) is not bytes or type(table) is not tuple:
        raise ProtocolError("checkpoint state is [snapshot, clients]")
    clients: dict[int, tuple[int, bytes]] = {}
    for row in table:
        if not (
            type(row) is tuple
            and len(row) == 3
            and type(row[0]) is int
            and 0 <= row[0] < n_clients
            and type(row[1]) is int
            and row[1] >= 0
            and type(row[2]) is bytes
        ):
            raise ProtocolError("checkpoint state client row is malformed")
        clients[row[0]] = (row[1], row[2])
    return app, clients
