"""A node's view of VM ownership, kept by the PBFT cluster (ACP, adaptive consensus protocol).

Why a cluster: an image can be copied to many hosts, but exactly one may run the VM.
The registry (``dwcp.consensus.registry``, owners are node ids, epochs are fencing
tokens) is replicated over n = 3f+1 replicas, so no single host, crashed or lying,
can make two nodes believe they own the same VM.

Around a migration the source node (the owner) does:

1. ``claim(vm, dst)`` before any byte is sent: read the owner; an unknown VM is
   registered to this node at epoch 1; a VM owned by a third node is refused.
2. the transfer; the destination verifies and stores the image.
3. ``hand_over(vm, dst, claim)``: ``MIGRATE(vm, me, dst, epoch)``, a compare-and-set
   on the epoch. Only now does the destination own the VM.

A crash between 2 and 3 leaves the source the owner (safe); re-running the migration
sends nothing new and commits. A node that does not own a VM cannot push an image
under its name, not even to the owner: that would overwrite the disk of a VM the
owner may be running. (So a hand-over that timed out but committed anyway makes the
re-run fail with "owned by <destination>": the first run did complete.)

The node may also host one replica (``[consensus] replica = N``) in its own event
loop (WAL fsyncs in a worker thread, so transfers are not held up). Its write-ahead
log lives in ``DATA/consensus/`` and is created once, explicitly, by ``dwcp cluster
join`` (``create_log``) before the first start. A node that finds no log at start
treats it as lost (disk replaced, directory wiped) and restarts the replica in
recovering mode: it never votes as a fresh replica that forgot its votes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwcp.consensus.members import MemberSet, decode_members
from dwcp.consensus.net import ClientPool, NetConfig, ReplicaServer
from dwcp.consensus.registry import Result, decode_result, encode_op
from dwcp.consensus.wal import Wal
from dwcp.errors import ConfigError, ConsensusError
from dwcp.identity import NodeKey, PublicKey
from dwcp.node.config import Consensus

log = logging.getLogger("dwcp.node")


@dataclass(frozen=True)
class Claim:
    """This node owns ``vm`` at ``epoch``: the compare-and-set value of the hand-over."""

    vm: str
    epoch: int


class Ownership:
    """The node's consensus client (and optional replica)."""

    def __init__(self, settings: Consensus, key: NodeKey, state_dir: Path) -> None:
        self.settings = settings
        self.net = NetConfig.load(settings.cluster)
        cfg = self.net.cluster
        self.me = key.node_id
        self.key = key
        self.state_dir = state_dir
        if cfg.client_index(key.public.raw) is None:
            raise ConfigError(
                f"{settings.cluster}: this node's key {key.public.text} is not among the "
                "cluster's clients; add it with 'dwcp cluster init ... --client PUBKEY'"
            )
        if not self.net.owner_check:
            raise ConfigError(
                f"{settings.cluster}: owner_check is false; node clusters must check that a "
                "node acts only for itself (write the file with 'dwcp cluster init')"
            )
        r = settings.replica
        if r is not None and (r >= cfg.n or cfg.replicas[r] != key.public):
            raise ConfigError(
                f"[consensus] replica = {r}: the cluster file lists "
                f"{'another key' if r < cfg.n else f'only {cfg.n} replicas'} there; "
                "use the index of this node's key in its 'replicas' list"
            )
        self.pool: ClientPool | None = None
        self.server: ReplicaServer | None = None
        self._lock = asyncio.Lock()  # one outstanding request per client key
        self.requests: dict[str, int] = {}

    def wal_path(self) -> Path | None:
        r = self.settings.replica
        return None if r is None else self.state_dir / f"replica-{r}.wal"

    def create_log(self) -> Path:
        """First start of this node's replica: create its empty log (``dwcp cluster join``).
        Refuses if one exists: replacing it would forget the replica's votes."""
        wal = self.wal_path()
        if wal is None:
            raise ConfigError("[consensus] has no 'replica = N': this node runs no replica")
        if wal.exists():
            raise ConfigError(f"{wal} exists: this replica has joined already")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.net.cluster
        Wal(
            wal,
            cluster_id=cfg.cluster_id,
            replica_id=self.settings.replica or 0,
            public_key=self.key.public.raw,
            create=True,
        ).close()
        return wal

    async def start(self) -> None:
        wal = self.wal_path()
        if wal is not None:
            r = self.settings.replica
            assert r is not None
            recovering = not wal.exists()
            if recovering:
                log.warning(
                    "replica %d has no log (%s): taken as lost, it rejoins without voting "
                    "until it has caught up. On the cluster's first start, stop the node and "
                    "run 'dwcp --config NODE.toml cluster join' on every replica node first.",
                    r,
                    wal,
                    extra={"event": "replica_recovering"},
                )
                self.state_dir.mkdir(parents=True, exist_ok=True)
            server = ReplicaServer(
                self.net, r, self.key, wal, recovering=recovering, sync_in_thread=True
            )
            await server.start()
            assert server.stopped is not None
            server.stopped.add_done_callback(_report_stop)
            self.server = server
        self.pool = ClientPool(self.net, [self.key])
        for link in self.pool.links.values():
            link.start()  # dial in the background: f replicas may be down

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.server is not None:
            self.server.close()  # waits for an fsync in flight

    async def request_raw(self, *op: str | int) -> bytes:
        """Order one registry op and return its committed answer (within ``[consensus]
        timeout``, else ``ConsensusError``); one request in flight per client key."""
        assert self.pool is not None
        timeout = self.settings.timeout
        try:
            async with asyncio.timeout(timeout):  # the wait for the lock included
                async with self._lock:
                    done = await self.pool.request(encode_op(*op))
        except TimeoutError:
            raise ConsensusError(
                f"no answer from the ownership cluster within {timeout:g} s ([consensus] "
                "timeout): fewer than 2f+1 replicas are reachable; check 'dwcp status'"
            ) from None
        return done.result

    async def member_set(self) -> MemberSet:
        """The fleet's committed member table (``dwcp.consensus.members``)."""
        return decode_members(await self.request_raw("members"))

    async def change_members(self, *op: str) -> Result:
        """Commit ``add_node``/``remove_node`` (``dwcp cluster add-node``/``remove-node``)."""
        return await self._request(*op)

    async def _request(self, *op: str | int) -> Result:
        result = decode_result(await self.request_raw(*op))
        key = f"{op[0]}:{'ok' if result.ok else result.reason}"
        self.requests[key] = self.requests.get(key, 0) + 1
        return result

    async def owner(self, vm: str) -> Result:
        """The committed owner and epoch of ``vm`` (a read ordered like any request)."""
        return await self._request("get", vm)

    async def claim(self, vm: str, dst: PublicKey) -> Claim:
        """Make sure this node may hand ``vm`` to ``dst``; raise ``ConsensusError`` if not."""
        got = await self.owner(vm)
        if not got.ok and got.reason == "unknown":
            got = await self._request("register", vm, self.me)
            if got.ok:
                log.info(
                    "registered VM %s to this node",
                    vm,
                    extra={"event": "vm_registered", "vm": vm, "epoch": got.epoch},
                )
        if got.owner == self.me:
            return Claim(vm, got.epoch)
        if got.owner == dst.node_id:
            raise ConsensusError(
                f"VM {vm} is already owned by the destination (node {got.owner}, epoch "
                f"{got.epoch}); nothing was sent (if an earlier run failed while committing, "
                "it had completed)"
            )
        raise ConsensusError(
            f"VM {vm} is owned by node {got.owner or '?'} (epoch {got.epoch}), not by this "
            "node; nothing was sent: migrate it from its owner"
        )

    async def hand_over(self, claim: Claim, dst: PublicKey) -> Result:
        """Commit the move of ``claim.vm`` to ``dst`` (compare-and-set on the epoch)."""
        got = await self._request("migrate", claim.vm, self.me, dst.node_id, claim.epoch)
        if got.ok:
            return got
        raise ConsensusError(
            f"the image was copied, but ownership of VM {claim.vm} did not move "
            f"({got.reason}: owner {got.owner or '?'}, epoch {got.epoch}); the VM stays "
            "with its owner"
        )

    def status(self) -> dict[str, Any]:
        cfg = self.net.cluster
        out: dict[str, Any] = {
            "cluster": str(self.settings.cluster),
            "replicas": cfg.n,
            "f": cfg.f,
            "node_id": self.me,
            "replica": self.settings.replica,
            "requests": dict(sorted(self.requests.items())),
            "connected": sum(
                1 for link in (self.pool.links.values() if self.pool else ()) if link.proto
            ),
        }
        if self.server is not None:
            rep = self.server.replica
            out.update(view=rep.view, executed=rep.last_executed, recovering=rep.recovering)
        return out


def _report_stop(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error(
            "the consensus replica stopped: %s; this node still proposes as a client",
            fut.exception(),
            extra={"event": "replica_failed"},
        )
