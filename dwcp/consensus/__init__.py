"""PBFT (Castro & Liskov) for committing VM migrations: sans-IO cores, signed messages, WAL.

Public API (stable; part B's simulator, network binding and benchmark use it):

- ``ClusterConfig(cluster_id: bytes, replicas: tuple[PublicKey, ...], clients:
  tuple[PublicKey, ...], checkpoint_interval=128, watermark_window=256,
  max_batch=64, max_inflight=4, view_change_timeout=1.0, client_retry=0.5,
  protocol_version=1, max_message_bytes=16 MiB, max_request_bytes=64 KiB)``;
  properties ``n``, ``f``, ``quorum`` (2f+1), ``weak_quorum`` (f+1),
  ``primary(view)``, ``client_index(raw_key)``. Replica ids are ``0..n-1``.
- ``Replica(config, replica_id, key: NodeKey, app: StateMachine, *, recovering=False)``:
  ``receive(data, now) -> list[Action]`` (one encoded message from a client or
  replica; bad input is dropped and counted in ``stats``, never raises, never
  changes state), ``receive_batch(datas, now)`` (``receive`` for each, then one
  proposal: messages that arrived together, e.g. in one event-loop turn, share a
  PRE-PREPARE), ``tick(now) -> list[Action]`` (timers), ``next_deadline() ->
  float | None``, ``recover(records, now) -> list[Action]`` (call once, right
  after construction, with the WAL's records). Read-only attributes: ``view``,
  ``last_executed``, ``stable_seq``, ``recovering``, ``stats``.
  A replica whose log was lost must be built with ``recovering=True``: it
  refuses to vote until 2f+1 other replicas told it where the cluster is and it
  has state-transferred past every sequence number it could have voted on.
- ``Client(config, key: NodeKey, *, codec: Codec | None = None)``: ``request(op,
  now) -> list[Action]`` (one outstanding request per client), ``receive(data,
  now) -> list[Completed]``, ``receive_decoded(signed, now)`` (the same for a
  message already parsed with ``Codec.decode``), ``tick(now) -> list[Action]``
  (re-sends to all replicas on timeout), ``next_deadline()``, ``busy``,
  ``client_id`` (raw public key bytes), ``advance_timestamp(ts)`` (wall-clock
  floor for the next timestamp), ``abandon()`` (stop waiting for a request).
  Clients of one process may share a ``codec`` so that a REPLIES message is
  verified once for all of them.
- Actions (``dwcp.consensus.actions``, frozen dataclasses): ``Persist(record)``
  and ``Compact(records)`` (append to / atomically replace the WAL; durable
  before any later action of the same list), ``Send(to, data)``,
  ``Broadcast(data)`` (replica: to every other replica; client: to all
  replicas), ``ReplyTo(client: bytes, data)``, and reports ``Executed(seq,
  view, request_digest, client, timestamp, result)``, ``Committed(seq, view,
  digest)`` (one per batch, null requests included), ``ViewChanged(view,
  primary)``, ``StateTransferred(seq)``, ``Recovered(seq, view)``. Client
  event: ``Completed(timestamp, op, result, proof)``.
- ``StateMachine`` protocol (``dwcp.consensus.app``; ``execute(op, client)``
  gets the signer's raw key for access control) and ``VMRegistry``
  (``dwcp.consensus.registry``, ops built with ``encode_op``, results parsed
  with ``decode_result``; ``check_owner=True`` lets a client act only for its
  own node id, as node clusters do: ``NetConfig.owner_check``).
- Nodes use it through ``dwcp.node.ownership``: a migration claims the VM
  before sending and commits ``MIGRATE`` after the destination verified it.
- ``Wal(path, *, cluster_id, replica_id, public_key, create=False)``:
  ``replay()``, ``append(records)`` (one fsync), ``rewrite(records)``,
  ``perform(actions) -> list[Action]`` (makes Persist/Compact durable, returns
  the rest), ``close()``.
- ``dwcp.consensus.messages``: ``Codec(config)`` (``encode``, ``decode``,
  ``verify``, ``open``), the message dataclasses and ``Kind``: useful to
  build Byzantine test messages.

Design choices worth knowing:

- Wire form ``[kind, sender, body, signature]`` (msgpack); the signature covers
  ``cluster_id, protocol_version, kind, sender`` and the body. For REQUEST the
  sender is the client's index in ``ClusterConfig.clients``.
- Replies: a batch of several requests is answered by one signed REPLIES
  (``view, [(client index, timestamp, result), ...]``) sent to each of its
  clients (the network binding sends it once per connection); a lone request,
  and a re-sent one, gets a REPLY. A client takes its entry of a REPLIES exactly
  like a REPLY, and ``Completed.proof`` holds whichever messages it accepted.
  This saves a signature per request at each replica and, for a client pool,
  a verification per request.
- Durability (see ``replica.py``): one fsync per request on the critical path,
  the prepared certificate before our COMMIT; other votes ride lazily with the
  next write. A replica restarted from its WAL therefore stays silent in the
  view it crashed in (it may have voted there without a record) and takes part
  again after the next view change; it may also have to learn its last batches
  again (retransmission or state transfer), but never votes differently.
- Lost log: ``recovering=True`` makes the replica ask 2f+1 others for their
  status and stay silent (no PRE-PREPARE/PREPARE/COMMIT/VIEW-CHANGE) until it
  state-transferred to a stable checkpoint at or above ``max(reported last
  executed) + L``; so the cluster has to advance by up to L sequence numbers
  before it votes again (an idle cluster keeps it waiting, safely).
- Liveness aids beyond the paper: a re-sent client request makes replicas
  re-send their votes (and the primary its PRE-PREPARE) for the uncommitted
  sequence numbers up to it; a replica that sees a lower-view message forwards
  its (self-certifying) NEW-VIEW; f+1 replicas working beyond our high
  watermark trigger state transfer.
- Sizes: VIEW-CHANGE carries full PRE-PREPAREs (with their requests) of every
  prepared batch above the stable checkpoint, so with K=128 and batches of 64
  it can reach megabytes; size ``max_message_bytes`` (and the transport's frame
  limit) for ``(K + max_inflight) * max_batch`` requests, or lower K.
"""

from __future__ import annotations

from dwcp.consensus.actions import (
    Action,
    Broadcast,
    ClientEvent,
    Committed,
    Compact,
    Completed,
    Executed,
    Persist,
    Recovered,
    ReplyTo,
    Send,
    StateTransferred,
    ViewChanged,
)
from dwcp.consensus.app import StateMachine
from dwcp.consensus.client import Client
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.registry import VMRegistry, decode_result, encode_op
from dwcp.consensus.replica import Replica
from dwcp.consensus.wal import Wal

__all__ = [
    "Action",
    "Broadcast",
    "Client",
    "ClientEvent",
    "ClusterConfig",
    "Committed",
    "Compact",
    "Completed",
    "Executed",
    "Persist",
    "Recovered",
    "Replica",
    "ReplyTo",
    "Send",
    "StateMachine",
    "StateTransferred",
    "VMRegistry",
    "ViewChanged",
    "Wal",
    "decode_result",
    "encode_op",
]
