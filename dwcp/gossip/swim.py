"""The SWIM + Lifeguard membership core of ASS: messages and ``now`` in, messages out.

Each probe period a member pings the next member of a shuffled round-robin order; on
timeout it asks ``indirect_checks`` others to ping for it (they answer with an ack, or a
nack when the target is silent, Lifeguard); with no ack by the end of the period it
suspects the target. A suspicion becomes a death when no refutation (a higher
incarnation from the suspect) arrives before the suspicion timeout, unless this member
was itself unwell meanwhile (it may have missed the refutation): then it pings the suspect
first. Updates ride on every message (and on gossip messages, sent only while there is
something to say).

``SwimConfig(lifeguard=False)`` is plain SWIM (fixed timeouts, no local health, no
nacks, fixed suspicion timeout, no buddy rule): the simulator runs both side by side.

The driver calls ``tick(now)`` at ``next_deadline()`` and ``receive(src, msg, now)`` per
message; both return ``[(destination, message), ...]``. State changes are appended to
``changes`` for the driver's logs and metrics. Anti-entropy (push-pull of the whole
member table, Lifeguard mode only) is in ``dwcp.gossip.pushpull``.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable

from dwcp.errors import ProtocolError
from dwcp.gossip import pushpull
from dwcp.gossip.broadcast import BroadcastQueue
from dwcp.gossip.health import Awareness, retransmit_limit, suspicion_min, suspicion_timeout
from dwcp.gossip.messages import (
    ACK,
    ALIVE,
    DEAD,
    GOSSIP,
    HEADER_BYTES,
    LEFT,
    NACK,
    PING,
    PING_REQ,
    PULL,
    PUSH,
    SUSPECT,
    Message,
    Update,
)
from dwcp.gossip.order import ProbeOrder
from dwcp.gossip.records import Change, Member, Probe, Suspicion, SwimConfig

Send = tuple[str, Message]
STAT_NAMES = (
    "probes",
    "probe_failures",
    "accusations",
    "indirect",
    "suspicions",
    "refutations",
    "deaths",
    "nacks_sent",
    "dropped",
    "sent",
    "received",
    "push_pulls",
    "rejected",
    "rechecks",
)
RECHECKS = 3
"""Direct pings a member that was itself unwell sends a suspect before it declares it dead."""

# timer kinds
_PROBE, _PROBE_TIMEOUT, _NACK, _RELAY_END, _SUSPICION, _GOSSIP, _PUSH_PULL = range(7)


class Swim:
    """One member's view of the fleet and its SWIM/Lifeguard protocol state."""

    def __init__(
        self,
        name: str,
        members: Iterable[str],
        *,
        now: float,
        config: SwimConfig | None = None,
        incarnation: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.config = cfg = config or SwimConfig()
        self.incarnation = incarnation
        self.rng = rng or random.Random()
        self.awareness = Awareness(cfg.awareness_max if cfg.lifeguard else 1)
        self.members: dict[str, Member] = {}
        self._peers = ProbeOrder()
        self.set_admitted(members, now)
        self.queue = BroadcastQueue(retransmit_limit(cfg.retransmit_mult, len(self.members) + 1))
        self.changes: list[Change] = []
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self.leaving = False
        self._seq = 0
        self._token = 0
        self._timers: list[tuple[float, int, int, object]] = []
        self._probe: Probe | None = None
        self._relays: dict[int, tuple[str, int]] = {}
        self._gossip_armed = False
        self._gossip_phase = self.rng.random() * cfg.gossip_interval
        self._reconnect_at = now + cfg.reconnect_interval
        self.queue.push((ALIVE, name, incarnation, name))
        self._arm(now + self.rng.random() * cfg.probe_interval, _PROBE, None)
        self._arm_gossip(now)
        self.last_rejection = ""
        self._unwell_at = -1.0  # last time this member had evidence that it missed messages
        self._pp_replied: dict[str, float] = {}
        self._pp_every = 0.0
        if cfg.lifeguard and cfg.push_pull_interval > 0:
            n = len(self.members) + 1 if cfg.push_pull_scale else 1
            self._pp_every = pushpull.interval(cfg.push_pull_interval, n)
            self._arm(now + self.rng.random() * self._pp_every, _PUSH_PULL, None)

    # --- membership (admission is decided elsewhere) --------------------------------------

    def set_admitted(self, names: Iterable[str], now: float) -> None:
        """Make exactly ``names`` (self excluded) the members; a removed one is forgotten."""
        wanted = {n for n in names if n != self.name}
        for n in list(self.members):
            if n not in wanted:
                del self.members[n]
        for n in sorted(wanted):
            if n not in self.members:
                self.members[n] = Member(n, now)
        self._peers.reset(sorted(self.members))

    def state_of(self, name: str) -> int:
        return self.members[name].state

    # --- timers ---------------------------------------------------------------------------

    def _arm(self, when: float, kind: int, arg: object) -> None:
        self._token += 1
        heapq.heappush(self._timers, (when, self._token, kind, arg))

    def _arm_gossip(self, now: float) -> None:
        if not self._gossip_armed and len(self.queue):
            # on this member's own ticker phase (memberlist's gossip ticker), not one
            # interval after the update arrived: that would add a full interval per hop
            self._gossip_armed = True
            step = self.config.gossip_interval
            wait = (self._gossip_phase - now) % step
            self._arm(now + (wait if wait > 1e-9 else step), _GOSSIP, None)

    def next_deadline(self) -> float:
        return self._timers[0][0] if self._timers else float("inf")

    def tick(self, now: float) -> list[Send]:
        """Run every timer due at ``now``."""
        out: list[Send] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, arg = heapq.heappop(timers)
            if kind == _PROBE:
                self._start_probe(now, out)
            elif kind == _PROBE_TIMEOUT:
                self._probe_timeout(arg, now, out)  # type: ignore[arg-type]
            elif kind == _NACK:
                relay = self._relays.get(arg)  # type: ignore[call-overload]
                if relay is not None:
                    self.stats["nacks_sent"] += 1
                    self._send(out, relay[0], NACK, relay[1], "", None)
            elif kind == _RELAY_END:
                self._relays.pop(arg, None)  # type: ignore[call-overload]
            elif kind == _SUSPICION:
                self._suspicion_fired(arg, now, out)  # type: ignore[arg-type]
            elif kind == _GOSSIP:
                self._gossip(now, out)
            elif kind == _PUSH_PULL:
                self._arm(now + self._pp_every, _PUSH_PULL, None)
                if not self.leaving:
                    for dst in self._random_members(1, "", now, alive_only=True):
                        self._send_table(out, dst, PUSH, now)
        self._arm_gossip(now)
        return out

    # --- probing --------------------------------------------------------------------------

    def _timeout_for(self, m: Member) -> float:
        cfg = self.config
        if m.rtts is not None:
            t = min(max(3.0 * max(m.rtts), cfg.min_probe_timeout), cfg.probe_interval / 2)
        else:
            t = cfg.probe_timeout
        return self.awareness.scale(t)

    def _start_probe(self, now: float, out: list[Send]) -> None:
        cfg = self.config
        period = self.awareness.scale(cfg.probe_interval)
        self._arm(now + period, _PROBE, None)
        self._finish_probe(now, out)
        target = self._peers.next(self.members, self.rng.random)
        if now >= self._reconnect_at:
            self._reconnect_at = now + cfg.reconnect_interval
            dead = [m.name for m in self.members.values() if m.state == DEAD]
            if dead:
                target = self.rng.choice(dead)
        if target is None or self.leaving:
            return
        m = self.members[target]
        self._seq += 1
        probe = self._probe = Probe(self._seq, target, now)
        self.stats["probes"] += 1
        self._arm(now + self._timeout_for(m), _PROBE_TIMEOUT, probe)
        self._send(out, target, PING, probe.seq, target, self._buddy(m))

    def _buddy(self, m: Member) -> Update | None:
        """Lifeguard's buddy rule: a suspect learns of its suspicion from the next ping.

        A member we hold dead that still talks to us (restarted with an old incarnation,
        memberlist #311) is told so in our ack, so it refutes instead of staying dead.
        """
        if m.state == DEAD or (self.config.lifeguard and m.state == SUSPECT):
            return (m.state, m.name, m.inc, self.name)
        return None

    def _probe_timeout(self, probe: Probe, now: float, out: list[Send]) -> None:
        if probe is not self._probe or probe.acked:
            return
        k = self.config.indirect_checks
        helpers = self._random_members(k, probe.target, now, alive_only=True)
        if self.config.lifeguard:
            probe.expected_nacks = len(helpers)
        for h in helpers:
            self.stats["indirect"] += 1
            self._send(out, h, PING_REQ, probe.seq, probe.target, None)

    def _finish_probe(self, now: float, out: list[Send]) -> None:
        probe, self._probe = self._probe, None
        if probe is None or probe.acked:
            return
        self.stats["probe_failures"] += 1
        self._unwell(max(0, probe.expected_nacks - probe.nacks) if probe.expected_nacks else 1, now)
        m = self.members.get(probe.target)
        if m is not None and m.state <= SUSPECT:
            # a suspect we also failed to reach: our own accusation is a confirmation
            self.stats["accusations"] += 1
            self._apply((SUSPECT, m.name, m.inc, self.name), now)

    def _random_members(self, k: int, exclude: str, now: float, *, alive_only: bool) -> list[str]:
        dead_since = now - self.config.gossip_to_dead
        return self._peers.sample(
            k, exclude, self.members, self.rng.random, alive_only=alive_only, dead_since=dead_since
        )

    # --- messages -------------------------------------------------------------------------

    def _send(
        self, out: list[Send], dst: str, kind: int, seq: int, target: str, first: Update | None
    ) -> None:
        budget = self.config.packet_budget - HEADER_BYTES - len(target)
        msg = Message(kind, seq, target, self.queue.take(budget, first))
        self.stats["sent"] += 1
        out.append((dst, msg))

    def receive(self, src: str, msg: Message, now: float) -> list[Send]:
        """Handle one authenticated message from member ``src``."""
        out: list[Send] = []
        m = self.members.get(src)
        if m is None:
            self.stats["dropped"] += 1
            return out
        self.stats["received"] += 1
        m.heard = now
        kind = msg.kind
        if kind in (PUSH, PULL):
            self._on_table(src, msg, now, out)
            self._arm_gossip(now)
            return out
        for u in msg.updates:
            self._apply(u, now)
        if kind == PING:
            if msg.target == self.name:
                self._send(out, src, ACK, msg.seq, "", self._buddy(m))
        elif kind == ACK:
            self._on_ack(src, msg.seq, now, out)
        elif kind == PING_REQ:
            self._relay(src, msg, now, out)
        elif kind == NACK:
            probe = self._probe
            if probe is not None and probe.seq == msg.seq:
                probe.nacks += 1
        self._arm_gossip(now)
        return out

    def _on_ack(self, src: str, seq: int, now: float, out: list[Send]) -> None:
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(out, relay[0], ACK, relay[1], "", None)
            return
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return
        probe.acked = True
        self.awareness.apply(-1)
        if src == probe.target:
            m = self.members[src]
            rtts = m.rtts if m.rtts is not None else []
            m.rtts = rtts
            rtts.append(now - probe.sent)
            if len(rtts) > 8:
                del rtts[0]

    def _relay(self, src: str, msg: Message, now: float, out: list[Send]) -> None:
        target = self.members.get(msg.target)
        if target is None or self.leaving:
            return
        self._seq += 1
        self._relays[self._seq] = (src, msg.seq)
        timeout = self._timeout_for(target)
        if self.config.lifeguard:
            self._arm(now + 0.8 * timeout, _NACK, self._seq)
        self._arm(now + self.config.probe_interval, _RELAY_END, self._seq)
        self._send(out, msg.target, PING, self._seq, msg.target, self._buddy(target))

    def _gossip(self, now: float, out: list[Send]) -> None:
        self._gossip_armed = False
        if not len(self.queue):
            return
        for dst in self._random_members(self.config.gossip_nodes, "", now, alive_only=False):
            self._send(out, dst, GOSSIP, 0, "", None)

    # --- anti-entropy (push-pull) ---------------------------------------------------------

    def table(self) -> list[Update]:
        """This member's view as updates: itself first, then every member heard of."""
        me = self.name
        rows: list[Update] = [(ALIVE, me, self.incarnation, me)]
        rows += [(m.state, m.name, m.inc, me) for m in self.members.values() if m.inc > 0]
        return rows

    def _send_table(self, out: list[Send], dst: str, kind: int, now: float) -> None:
        self._seq += 1
        msgs = pushpull.chunks(kind, self._seq, self.table(), self.config.push_pull_chunk_bytes)
        self.stats["sent"] += len(msgs)
        out.extend((dst, msg) for msg in msgs)

    def _on_table(self, src: str, msg: Message, now: float, out: list[Send]) -> None:
        try:
            pushpull.check_chunk(msg, len(self.members))
        except ProtocolError as exc:
            self.stats["rejected"] += 1
            self.last_rejection = f"from {src}: {exc}"
            return
        members = self.members
        for u in msg.updates:
            m = members.get(u[1])
            if m is not None and m.inc == u[2] and m.state == u[0]:
                continue  # the common case: both views agree
            self._apply(u, now)
        if pushpull.chunk_fields(msg.seq)[1] != 0:
            return
        self.stats["push_pulls"] += 1
        # answer a push once per exchange, and a member at most 4x per interval (a member
        # replaying pushes cannot make this one send its table in a loop)
        if msg.kind == PUSH and self._pp_every > 0 and not self.leaving:
            last = self._pp_replied.get(src)
            if last is None or now - last >= self._pp_every / 4:
                self._pp_replied[src] = now
                self._send_table(out, src, PULL, now)

    # --- updates --------------------------------------------------------------------------

    def _change(self, m: Member, state: int, inc: int, by: str, now: float) -> None:
        self.changes.append(Change(now, m.name, m.state, state, inc, by))
        m.state, m.inc, m.since = state, inc, now

    def _apply(self, u: Update, now: float) -> None:
        state, name, inc, origin = u
        if name == self.name:
            self._about_self(u, now)
            return
        m = self.members.get(name)
        if m is None:
            self.stats["dropped"] += 1
            return
        if state == ALIVE:
            if inc <= m.inc:
                return
            m.susp = None
            self._change(m, ALIVE, inc, origin, now)
            self.queue.push(u)
        elif state == SUSPECT:
            if inc < m.inc or m.state > SUSPECT:
                return
            if m.state == SUSPECT and inc == m.inc:
                self._confirm(m, origin, now)
                return
            self.stats["suspicions"] += 1
            self._change(m, SUSPECT, inc, origin, now)
            self.queue.push(u)
            self._token += 1
            m.susp = Suspicion(now, origin, self._token)
            self._rearm_suspicion(m)
        else:
            if inc < m.inc or m.state > SUSPECT:
                return
            m.susp = None
            self._change(m, state, inc, origin, now)
            self.queue.push(u)

    def _wanted(self) -> int:
        k = self.config.suspicion_mult - 2
        return 0 if len(self.members) - 1 < k or not self.config.lifeguard else k

    def _bounds(self) -> tuple[float, float]:
        cfg = self.config
        lo = suspicion_min(cfg.suspicion_mult, len(self.members) + 1, cfg.probe_interval)
        return lo, (lo * cfg.suspicion_max_mult if cfg.lifeguard else lo)

    def _rearm_suspicion(self, m: Member) -> None:
        s = m.susp
        assert s is not None
        if s.pings:
            return  # a recheck is under way: it ends by itself (_suspicion_fired)
        lo, hi = self._bounds()
        s.deadline = s.start + suspicion_timeout(len(s.confirmed) - 1, self._wanted(), lo, hi)
        heapq.heappush(self._timers, (s.deadline, s.token, _SUSPICION, (m, s)))

    def _confirm(self, m: Member, origin: str, now: float) -> None:
        s = m.susp
        if s is None or origin in s.confirmed or not self.config.lifeguard:
            return
        if len(s.confirmed) - 1 >= self._wanted():
            return
        s.confirmed.add(origin)
        self.queue.push((SUSPECT, m.name, m.inc, origin))
        self._rearm_suspicion(m)

    def _suspicion_fired(self, arg: tuple[Member, Suspicion], now: float, out: list[Send]) -> None:
        m, s = arg
        if m.susp is not s or now < s.deadline or m.state != SUSPECT:
            return
        lo, hi = self._bounds()
        unwell = self._unwell_at >= s.checked or self.awareness.score > 0
        if self.config.lifeguard and now < s.start + 2 * hi and (unwell or 0 < s.pings < RECHECKS):
            # This member is or was unwell (missed acks or nacks, or was itself suspected)
            # since the suspicion began: it may have missed the refutation too (a stalled or
            # slow receiver whose timers ran on). Fresh evidence first: RECHECKS direct pings
            # carrying the accusation (the suspect refutes in its ack), spread over the
            # shortest suspicion timeout while this member is well (it starts over if not),
            # and never past twice the longest timeout (a member unwell for good, e.g. one
            # side of a partition, still decides).
            s.pings = 1 if unwell else s.pings + 1
            s.checked = now
            self.stats["rechecks"] += 1
            s.deadline = now + lo / RECHECKS
            heapq.heappush(self._timers, (s.deadline, s.token, _SUSPICION, (m, s)))
            self._seq += 1
            self._send(out, m.name, PING, self._seq, m.name, self._buddy(m))
            return
        self.stats["deaths"] += 1
        self._apply((DEAD, m.name, m.inc, self.name), now)

    def _unwell(self, delta: int, now: float) -> None:
        """Lifeguard's local health: raise the awareness score; remember when (see above)."""
        self.awareness.apply(delta)
        if delta > 0:
            self._unwell_at = now

    def _about_self(self, u: Update, now: float) -> None:
        state, _, inc, _ = u
        if self.leaving:
            return
        if state == ALIVE and inc <= self.incarnation:
            return
        if state != ALIVE and inc < self.incarnation:
            # a stale accusation: whoever still holds it missed our refutation; say it again
            if self.queue.pending(self.name) is None:
                self.queue.push((ALIVE, self.name, self.incarnation, self.name))
            return
        self.incarnation = inc + 1
        self.stats["refutations"] += 1
        self._unwell(1, now)
        self.queue.push((ALIVE, self.name, self.incarnation, self.name))

    def announce(self, now: float) -> None:
        """Start a new incarnation and gossip it (after a restart, or to test dissemination)."""
        self.incarnation += 1
        self.queue.push((ALIVE, self.name, self.incarnation, self.name))
        self._arm_gossip(now)

    def leave(self, now: float) -> list[Send]:
        """Announce a graceful leave (others mark this member ``left``, not dead)."""
        self.leaving = True
        self.queue.push((LEFT, self.name, self.incarnation, self.name))
        out: list[Send] = []
        for dst in self._random_members(self.config.gossip_nodes, "", now, alive_only=True):
            self._send(out, dst, GOSSIP, 0, "", None)
        return out
