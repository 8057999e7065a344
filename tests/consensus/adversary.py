"""Byzantine behaviours for the simulator, built from real keys and the real codec.

Why wrappers: a Byzantine replica that runs the honest core and then rewrites
what it sends stays protocol-plausible (right views, sequence numbers and
digests), which is what reaches the deep branches of an implementation; pure
noise is rejected by the first decode. Every choice uses the run's seeded RNG.

- ``Equivocator``: as primary, sends different PRE-PREPAREs for one (view, seq)
  to different backups, and adds PREPAREs of its own (the primary must not vote).
- ``DoubleVoter``: sends conflicting PREPAREs/COMMITs (one digest to some
  peers, another to others), duplicates, and votes for views and sequence
  numbers ahead of the cluster.
- ``BogusNewView``: as new primary, replaces its NEW-VIEW by a wrong one: an O
  set with a dropped or substituted PRE-PREPARE, a forged VIEW-CHANGE, or a
  VIEW-CHANGE with an invalid prepared certificate mixed among valid ones.
- ``Forger``: bad signatures, another replica's sender id, messages signed for
  another cluster id, random bytes, truncations, oversized frames.
- ``Liar``: honest votes, lying STATE blobs, CHECKPOINT digests, STATUS and REPLY.
- ``Spray``: a network adversary (not a replica, so it does not count toward f)
  that replays old captured traffic to random replicas and re-signs captured
  messages for another cluster with the senders' keys.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from simnet import Sim, SimNode

from dwcp.consensus.actions import Broadcast, Send
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.messages import (
    Codec,
    Commit,
    Kind,
    Message,
    NewView,
    Prepare,
    PreparedProof,
    PrePrepare,
    Signed,
    ViewChange,
)
from dwcp.consensus.registry import VMRegistry, encode_op
from dwcp.errors import ProtocolError
from dwcp.identity import NodeKey


class Wrapper:
    """Runs an honest core and rewrites its outgoing actions."""

    def __init__(
        self, inner: SimNode, config: ClusterConfig, rid: int, key: NodeKey, rng: random.Random
    ) -> None:
        self.inner = inner
        self.config = config
        self.id = rid
        self.key = key
        self.rng = rng
        self.codec = Codec(config)
        self.sent = 0

    def receive(self, data: bytes, now: float) -> list[Any]:
        return self.rewrite(self.inner.receive(data, now))

    def tick(self, now: float) -> list[Any]:
        return self.rewrite(self.inner.tick(now))

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def peers(self) -> list[int]:
        return [j for j in range(self.config.n) if j != self.id]

    def sign(self, msg: Message) -> bytes:
        self.sent += 1
        return self.codec.encode(msg, self.id, self.key)

    def decode(self, data: bytes) -> Signed | None:
        try:
            return self.codec.decode(data)
        except ProtocolError:
            return None

    def rewrite(self, actions: list[Any]) -> list[Any]:
        out: list[Any] = []
        for a in actions:
            if isinstance(a, Broadcast | Send):
                s = self.decode(a.data)
                if s is not None:
                    out.extend(self.outgoing(a, s))
                    continue
            out.append(a)
        return out

    def outgoing(self, action: Any, s: Signed) -> list[Any]:
        return [action]


class Equivocator(Wrapper):
    def outgoing(self, action: Any, s: Signed) -> list[Any]:
        msg = s.msg
        if not isinstance(msg, PrePrepare) or not isinstance(action, Broadcast):
            return [action]
        reqs = list(msg.requests)
        variants = [msg]
        alt_reqs = tuple(reversed(reqs)) if len(reqs) > 1 else ()
        if alt_reqs != msg.requests:
            variants.append(PrePrepare(msg.view, msg.seq, alt_reqs))
        if reqs:
            variants.append(PrePrepare(msg.view, msg.seq, tuple(reqs[:1])))
        out: list[Any] = []
        raws = {v.digest: (v, self.sign(v) if v is not msg else action.data) for v in variants}
        for j in self.peers():
            v, raw = self.rng.choice(list(raws.values()))
            out.append(Send(j, raw))
        # A primary's PREPAREs for every variant: must never count toward a quorum.
        for v, _ in raws.values():
            out.append(Broadcast(self.sign(Prepare(v.view, v.seq, v.digest))))
        return out


class DoubleVoter(Wrapper):
    def outgoing(self, action: Any, s: Signed) -> list[Any]:
        msg = s.msg
        if not isinstance(msg, Prepare | Commit):
            return [action]
        cls = type(msg)
        out: list[Any] = []
        for j in self.peers():
            r = self.rng.random()
            if r < 0.4:
                fake = cls(msg.view, msg.seq, self.rng.randbytes(32))
                out.append(Send(j, self.sign(fake)))
                out.append(Send(j, action.data))
            elif r < 0.6:
                out.append(Send(j, action.data))
                out.append(Send(j, action.data))
            elif r < 0.8:
                ahead = cls(
                    msg.view + self.rng.randint(0, 2), msg.seq + self.rng.randint(1, 6), msg.digest
                )
                out.append(Send(j, self.sign(ahead)))
                out.append(Send(j, action.data))
            else:
                out.append(Send(j, self.sign(cls(msg.view, msg.seq, self.rng.randbytes(32)))))
        return out


class BogusNewView(Wrapper):
    def __init__(self, *a: Any, mode: str | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.mode = mode
        self.forged = 0

    def outgoing(self, action: Any, s: Signed) -> list[Any]:
        msg = s.msg
        if not isinstance(msg, NewView):
            return [action]
        out: list[Any] = []
        for j in self.peers():
            bad = self.corrupt(msg)
            if bad is None:
                out.append(Send(j, action.data))
            else:
                self.forged += 1
                out.append(Send(j, self.sign(bad)))
        return out

    def corrupt(self, nv: NewView) -> NewView | None:
        mode = self.mode or self.rng.choice(["drop-o", "swap-o", "forge-vc", "bad-cert", "extra-o"])
        if mode == "drop-o" and nv.pre_prepares:
            k = self.rng.randrange(len(nv.pre_prepares))
            return replace(nv, pre_prepares=nv.pre_prepares[:k] + nv.pre_prepares[k + 1 :])
        if mode == "swap-o" and nv.pre_prepares:
            k = self.rng.randrange(len(nv.pre_prepares))
            s = self.decode(nv.pre_prepares[k])
            if s is not None and isinstance(s.msg, PrePrepare):
                pp = s.msg
                reqs = pp.requests[:-1] if pp.requests else ()
                alt = self.sign(PrePrepare(pp.view, pp.seq, reqs))
                o = list(nv.pre_prepares)
                o[k] = alt
                return replace(nv, pre_prepares=tuple(o))
        if mode == "extra-o":
            top = 0
            for raw in nv.pre_prepares:
                s = self.decode(raw)
                if s is not None and isinstance(s.msg, PrePrepare):
                    top = max(top, s.msg.seq)
            extra = self.sign(PrePrepare(nv.view, top + 1, ()))
            return replace(nv, pre_prepares=(*nv.pre_prepares, extra))
        if mode == "forge-vc" and nv.view_changes:
            k = self.rng.randrange(len(nv.view_changes))
            raw = bytearray(nv.view_changes[k])
            raw[-1 - self.rng.randrange(64)] ^= 0x40  # inside the signature
            vcs = list(nv.view_changes)
            vcs[k] = bytes(raw)
            return replace(nv, view_changes=tuple(vcs))
        if mode == "bad-cert":
            return self.bad_cert(nv)
        return None

    def bad_cert(self, nv: NewView) -> NewView | None:
        """Own VIEW-CHANGE claiming a higher-view prepared certificate with forged PREPAREs."""
        own = None
        for raw in nv.view_changes:
            s = self.decode(raw)
            if s is not None and s.sender == self.id and isinstance(s.msg, ViewChange):
                own = s.msg
        if own is None:
            return None
        seq = own.stable_seq + 1
        pp = PrePrepare(max(nv.view - 1, 0), seq, ())
        # The primary of that view signs PRE-PREPAREs; this replica cannot, so it signs it
        # itself, and forges the PREPAREs with its own key under other senders' ids.
        fake_prepares = tuple(
            self.codec.encode(Prepare(pp.view, seq, pp.digest), j, self.key)
            for j in self.peers()[: self.config.quorum - 1]
        )
        cert = PreparedProof(self.sign(pp), fake_prepares)
        bad_vc = replace(own, prepared=(*own.prepared, cert))
        vcs = [raw for raw in nv.view_changes if (self.decode(raw) or _NONE).sender != self.id]
        vcs.insert(self.rng.randrange(len(vcs) + 1), self.sign(bad_vc))
        return replace(nv, view_changes=tuple(vcs))


class _NoneSigned:
    sender = -1


_NONE: Any = _NoneSigned()


def other_cluster(config: ClusterConfig) -> ClusterConfig:
    return replace(config, cluster_id=config.cluster_id + b"-other")


class Forger(Wrapper):
    """Adds malformed and misauthenticated copies to what it sends."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.other = Codec(other_cluster(self.config))

    def outgoing(self, action: Any, s: Signed) -> list[Any]:
        out: list[Any] = [action]
        raw = action.data
        for j in self.peers():
            r = self.rng.randrange(7)
            if r == 0:  # signature bit flipped
                b = bytearray(raw)
                b[-1 - self.rng.randrange(64)] ^= 1 << self.rng.randrange(8)
                out.append(Send(j, bytes(b)))
            elif r == 1:  # claims another replica as sender, signed with this key
                other = self.rng.choice([k for k in range(self.config.n) if k != self.id])
                out.append(Send(j, self.codec.encode(s.msg, other, self.key)))
            elif r == 2:  # valid in another cluster
                out.append(Send(j, self.other.encode(s.msg, self.id, self.key)))
            elif r == 3:
                out.append(Send(j, self.rng.randbytes(self.rng.randrange(1, 300))))
            elif r == 4:
                out.append(Send(j, raw[: self.rng.randrange(len(raw))]))
            elif r == 5:  # body byte flipped (signature no longer matches)
                b = bytearray(raw)
                b[self.rng.randrange(max(1, len(b) - 64))] ^= 0x01
                out.append(Send(j, bytes(b)))
            else:
                out.append(Send(j, raw + b"\x00"))
        if self.rng.random() < 0.02:
            big = b"\x94\x03\x00\xc6" + (self.config.max_message_bytes + 1).to_bytes(4, "big")
            out.append(Broadcast(big + bytes(self.config.max_message_bytes + 1)))
        return out


class Spray:
    """Network adversary: replays captured traffic and its other-cluster twin."""

    def __init__(self, sim: Sim, config: ClusterConfig, keys: list[NodeKey], rng: random.Random):
        self.sim = sim
        self.config = config
        self.keys = keys
        self.rng = rng
        self.codec = Codec(config)
        self.other = Codec(other_cluster(config))
        self.captured: list[bytes] = []
        self.injected = 0
        sim.taps.append(self.tap)

    def tap(self, src: str, dst: str, data: bytes) -> None:
        if len(self.captured) < 5000 and self.rng.random() < 0.2:
            self.captured.append(data)

    def burst(self, count: int = 20) -> None:
        replicas = [n for n, i in self.sim.instances.items() if i.kind == "replica"]
        for _ in range(count):
            if not self.captured:
                return
            data = self.rng.choice(self.captured)
            if self.rng.random() < 0.3:
                s = self._decode(data)
                if s is not None and s.kind is not Kind.REQUEST:
                    data = self.other.encode(s.msg, s.sender, self.keys[s.sender])
            self.injected += 1
            self.sim.inject("spray", self.rng.choice(replicas), data, self.rng.uniform(0, 0.01))

    def _decode(self, data: bytes) -> Signed | None:
        try:
            return self.codec.decode(data)
        except ProtocolError:
            return None

    def every(self, period: float, until: float) -> None:
        def fire() -> None:
            self.burst()
            if self.sim.now + period < until:
                self.sim.at(self.sim.now + period, fire)

        self.sim.at(period, fire)


def wrapper(cls: type[Wrapper], **kw: Any) -> Callable[[Any, int], Callable[[SimNode], SimNode]]:
    """Adapter for ``Cluster(byzantine=...)``: wraps replica ``rid``'s core in ``cls``."""

    def make(cluster: Any, rid: int) -> Callable[[SimNode], SimNode]:
        def wrap(inner: SimNode) -> SimNode:
            rng = random.Random(cluster.seed * 1009 + rid)
            w = cls(inner, cluster.config, rid, cluster.rkeys[rid], rng, **kw)
            cluster.adversaries.append(w)
            return w

        return wrap

    return make


class Liar(Wrapper):
    """Honest votes, but lies wherever a single replica's word is taken or compared.

    Wrong STATE blobs (with the genuine proof), wrong CHECKPOINT digests, STATUS
    answers with absurd or zero positions, and wrong REPLY results.
    """

    def outgoing(self, action: Any, s: Signed) -> list[Any]:
        from dwcp.consensus.messages import Checkpoint, Replies, Reply, State, Status

        msg = s.msg
        bad: Message | None = None
        if isinstance(msg, State):
            reg = VMRegistry()
            reg.execute(encode_op("register", "vm0", "mallory"))
            bad = State(msg.seq, reg.snapshot(), msg.proof)
        elif isinstance(msg, Checkpoint):
            bad = Checkpoint(msg.seq, self.rng.randbytes(32))
        elif isinstance(msg, Status):
            big = self.rng.random() < 0.5
            bad = Status(msg.nonce, msg.view + (1000 if big else 0), 10**6 if big else 0, 0)
        elif isinstance(msg, Reply):
            bad = Reply(msg.view, msg.client, msg.timestamp, b"\x93\xa2ok\xa7mallory\x09")
        elif isinstance(msg, Replies):
            lie = b"\x93\xa2ok\xa7mallory\x09"
            bad = Replies(msg.view, tuple((c, ts, lie) for c, ts, _ in msg.entries))
        if bad is None:
            return [action]
        self.sent += 1
        raw = self.sign(bad)
        return [Broadcast(raw)] if isinstance(action, Broadcast) else [replace(action, data=raw)]


class EvilClient:
    """An authorised client that equivocates: one timestamp, different ops to different replicas.

    It also replays its old requests and re-uses old timestamps with new ops. Runs as a
    simulator node on its own schedule (``tick``); replies to it are ignored.
    """

    def __init__(self, config: ClusterConfig, index: int, key: NodeKey, rng: random.Random):
        self.config = config
        self.index = index
        self.key = key
        self.rng = rng
        self.codec = Codec(config)
        self.ts = 10
        self.old: list[bytes] = []
        self.at = 0.002
        self.rounds = 0

    def receive(self, data: bytes, now: float) -> list[Any]:
        return []

    def next_deadline(self) -> float | None:
        return self.at if self.rounds < 40 else None

    def tick(self, now: float) -> list[Any]:
        from dwcp.consensus.messages import Request

        if now < self.at:
            return []
        self.rounds += 1
        self.at = now + self.rng.uniform(0.001, 0.02)
        out: list[Any] = []
        r = self.rng.random()
        if r < 0.6:
            self.ts += 1
            for j in range(self.config.n):
                op = encode_op("migrate", "vm0", "h0", f"h{j}", self.rng.randint(0, 3))
                raw = self.codec.encode(Request(self.ts, op), self.index, self.key)
                self.old.append(raw)
                out.append(Send(j, raw))
        elif r < 0.8 and self.old:
            out.append(Send(self.rng.randrange(self.config.n), self.rng.choice(self.old)))
        else:
            stale = max(1, self.ts - self.rng.randint(0, 5))
            op = encode_op("register", f"vm{self.rng.randrange(3)}", "evil")
            out.append(Broadcast(self.codec.encode(Request(stale, op), self.index, self.key)))
        return out


class StaleCerts(Wrapper):
    """Sends VIEW-CHANGEs whose prepared set is rebuilt from genuine certificates it has seen,
    picking older views, omitting some sequence numbers, and sending different sets to
    different replicas. Every certificate verifies; only the choice is adversarial.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.pps: dict[tuple[int, int, bytes], bytes] = {}
        self.prepares: dict[tuple[int, int, bytes], dict[int, bytes]] = {}
        self.rewritten = 0

    def receive(self, data: bytes, now: float) -> list[Any]:
        self._capture(data)
        return self.rewrite(self.inner.receive(data, now))

    def _capture(self, data: bytes) -> None:
        s = self.decode(data)
        if s is None:
            return
        msg = s.msg
        try:
            if isinstance(msg, PrePrepare) and s.sender == self.config.primary(msg.view):
                self.codec.verify(s)
                self.pps[(msg.view, msg.seq, msg.digest)] = data
            elif isinstance(msg, Prepare) and s.sender != self.config.primary(msg.view):
                self.codec.verify(s)
                self.prepares.setdefault((msg.view, msg.seq, msg.digest), {})[s.sender] = data
        except Exception:
            return

    def certs(self, above: int) -> dict[int, list[PreparedProof]]:
        need = 2 * self.config.f
        out: dict[int, list[PreparedProof]] = {}
        for key, pp in self.pps.items():
            votes = self.prepares.get(key, {})
            if key[1] > above and len(votes) >= need:
                proof = PreparedProof(pp, tuple(sorted(votes.values()))[:need])
                out.setdefault(key[1], []).append(proof)
        return out

    def outgoing(self, action: Any, s: Signed) -> list[Any]:
        if isinstance(action, Send | Broadcast) and s.kind is Kind.PREPARE:
            self._capture(action.data)
        msg = s.msg
        if not isinstance(msg, ViewChange):
            return [action]
        out: list[Any] = []
        targets = [action.to] if isinstance(action, Send) else self.peers()
        pool = self.certs(msg.stable_seq)
        for j in targets:
            chosen = []
            for _seq, options in sorted(pool.items()):
                if self.rng.random() < 0.8:
                    chosen.append(self.rng.choice(options))
            bad = replace(msg, prepared=tuple(chosen))
            self.rewritten += 1
            out.append(Send(j, self.sign(bad)))
        return out


class SlowPrimary(Wrapper):
    """Aardvark's slow primary: holds each PRE-PREPARE for ``delay`` seconds, just under the
    backups' patience, so it is never replaced but throughput collapses."""

    def __init__(self, *a: Any, delay: float = 0.4, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.delay = delay
        self.held: list[tuple[float, Any]] = []
        self.now = 0.0

    def receive(self, data: bytes, now: float) -> list[Any]:
        self.now = now
        return self.rewrite(self.inner.receive(data, now)) + self._release(now)

    def tick(self, now: float) -> list[Any]:
        self.now = now
        return self.rewrite(self.inner.tick(now)) + self._release(now)

    def next_deadline(self) -> float | None:
        times = [t for t, _ in self.held]
        inner = self.inner.next_deadline()
        if inner is not None:
            times.append(inner)
        return min(times) if times else None

    def _release(self, now: float) -> list[Any]:
        due = [a for t, a in self.held if t <= now]
        self.held = [(t, a) for t, a in self.held if t > now]
        return due

    def outgoing(self, action: Any, s: Signed) -> list[Any]:
        if isinstance(s.msg, PrePrepare):
            self.held.append((self.now + self.delay, action))
            self.sent += 1
            return []
        return [action]


class RequestForger(Wrapper):
    """As primary, slips requests "from" authorised clients, signed with its own key, into
    its batches (and sends a batch of only forged requests now and then)."""

    def outgoing(self, action: Any, s: Signed) -> list[Any]:
        from dwcp.consensus.messages import Request

        msg = s.msg
        if not isinstance(msg, PrePrepare) or not isinstance(action, Broadcast):
            return [action]
        victim = self.rng.randrange(len(self.config.clients))
        op = encode_op("migrate", "vm0", "h0", "mallory", self.rng.randint(0, 4))
        forged = self.codec.encode(Request(10**15 + self.sent, op), victim, self.key)
        reqs = (*msg.requests, forged) if self.rng.random() < 0.7 else (forged,)
        self.sent += 1
        return [Broadcast(self.sign(PrePrepare(msg.view, msg.seq, reqs)))]
