"""A sans-IO, receiver-driven scheduler that pulls one transfer from many sources.

Fed chunks, sources, rate predictions and events (bytes arrived, a chunk verified or not,
a source lost, the clock), it returns requests, cancels and exclusions; the caller owns
the sockets and the clock. Why receiver-driven: only the receiver sees every source's
progress at once, so only it can move work from a source that slowed down.

How it decides (after Kraken, aria2 and Rodriguez & Biersack, see
shared/research/wave2-ass-itp-pba.md section 2):

- Plan: chunks with the fewest live holders first, each to the holder that would finish
  it earliest at its planning rate (its backlog plus the chunk, over its rate), so a
  source's share follows its predicted bandwidth and chunks only few hold go first.
- Pipelining: each source has ceil(rate * RTT / piece) + 1 requests in flight (at least
  two), so its link never idles waiting for the next request.
- Stealing: a source whose queue runs dry takes queued chunks from the tail of the
  source that would finish last, as long as the move finishes them sooner.
- Measuring: each source's rate is sampled over busy intervals and given to the
  estimator; a planning rate that moves by more than a third re-plans every queued chunk,
  and a source under half its planning rate has its in-flight chunks moved when another
  holder would finish them sooner.
- Death: a source that delivers nothing for its stall time while it has requests (or
  that the caller reports lost) has all its work put back and re-planned at once. The
  stall time is ``stall_timeout``, or, with ``stall_pieces`` set, at least that many
  times the time its requests in flight take at its planning rate: where bytes are
  only seen as whole pieces (a real pull's replies) that arrive together on one link, a
  slow source's silence between pieces is not death. A
  stalled source (not a lost one) is only quiet, perhaps on a loaded host: when some chunk
  would otherwise have no live holder, it is revived with a doubled stall timeout, at most
  ``max_revivals`` times, before the transfer gives up on it.
- Endgame: an idle source with nothing to steal duplicates the in-flight chunk that would
  arrive last, if it would finish it sooner, within a byte budget; the first copy to
  arrive wins and the others are cancelled.
- Verification: the caller checks each chunk against the manifest (the delta engine's
  fingerprints) and says so; a source that sends one wrong chunk is excluded for the rest
  of the transfer and its work re-planned, so the result is still correct.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from dwcp.itp.model import Action, Cancel, Chunk, Exclude, Holdings, RateEstimator, Request
from dwcp.itp.state import (
    DEAD,
    EXCLUDED,
    LIVE,
    Config,
    Flight,
    Report,
    SourceReport,
    SourceState,
    StuckError,
)

__all__ = ["Config", "Report", "Scheduler", "SourceReport", "StuckError"]


class Scheduler:
    """One transfer; call ``start`` once, then feed events until ``done``."""

    def __init__(
        self,
        chunks: Sequence[Chunk],
        sources: Iterable[str],
        rates: RateEstimator,
        holdings: Holdings,
        config: Config | None = None,
        rtt: Mapping[str, float] | None = None,
    ) -> None:
        self.config = cfg = config or Config()
        self._chunks = {c.index: c for c in chunks}
        self._rates = rates
        self._holders = {c.index: holdings.holders(c.index) for c in chunks}
        self._src = {
            s: SourceState(
                s,
                (rtt or {}).get(s, cfg.default_rtt),
                max(rates.rate(s), 1.0),
                stall_timeout=cfg.stall_timeout,
            )
            for s in sources
        }
        self._piece = max((c.size for c in chunks), default=1)
        self._done: set[int] = set()
        self._queued_at: dict[int, str] = {}
        self.stuck: set[int] = set()
        self._dup = 0
        self._rejected = 0
        self._endgame_bytes = 0
        self._budget = cfg.endgame_budget * sum(c.size for c in chunks)
        self._events: list[tuple[float, str, str]] = []
        self._started = False

    # ------------------------------------------------------------------ events

    @property
    def done(self) -> bool:
        return len(self._done) == len(self._chunks)

    def start(self, now: float) -> list[Action]:
        """Plan every chunk and issue the first requests."""
        self._started = True
        self._assign(sorted(self._chunks), now)
        return self._pump(now)

    def on_progress(self, source: str, chunk: int, nbytes: int, now: float) -> list[Action]:
        """``nbytes`` more of ``chunk`` arrived from ``source`` (not verified yet)."""
        s = self._src[source]
        s.bytes_wire += nbytes
        flight = s.flights.get(chunk)
        if flight is None or s.state != LIVE:
            # Late bytes of a cancelled or moved request: wasted.
            self._waste(s, nbytes)
            return []
        flight.received += nbytes
        s.deadline = now + self._stall(s)
        if s.sample_start is None:
            s.sample_start, s.sample_bytes = now, 0
        else:
            s.sample_bytes += nbytes
        return []

    def on_chunk(self, source: str, chunk: int, ok: bool, now: float) -> list[Action]:
        """All of ``chunk`` arrived from ``source``; ``ok`` is the manifest check's verdict."""
        s = self._src[source]
        flight = s.flights.pop(chunk, None)
        received = flight.received if flight else 0
        self._idle_check(s, now)
        if not ok:
            self._rejected += received
            out = self._exclude(s, f"sent chunk {chunk} that does not match the manifest", now)
            if chunk not in self._done and not self._flying(chunk) and chunk not in self._queued_at:
                self._assign([chunk], now)
                out += self._pump(now)
            return out
        if flight is None or chunk in self._done or s.state != LIVE:
            self._waste(s, received)
            return self._pump(now)
        self._done.add(chunk)
        s.bytes_ok += self._chunks[chunk].size
        s.chunks_ok += 1
        actions: list[Action] = []
        for other in self._src.values():
            late = other.flights.pop(chunk, None)
            if late is not None:
                self._dup += late.received
                self._idle_check(other, now)
                actions.append(Cancel(other.name, chunk))
        actions += self._pump(now)
        return actions

    def on_source_lost(
        self, source: str, now: float, reason: str = "connection lost"
    ) -> list[Action]:
        """The caller knows ``source`` is gone (QUIC idle, gossip suspect, reset)."""
        s = self._src[source]
        if s.state != LIVE:
            return []
        return self._drop(s, DEAD, reason, now)

    def tick(self, now: float) -> list[Action]:
        """The clock: measure rates, find stalled and slow sources, re-plan."""
        cfg = self.config
        actions: list[Action] = []
        replan = False
        for s in list(self._src.values()):
            if s.state != LIVE:
                continue
            if s.flights and now > s.deadline:
                s.stalled = True
                actions += self._drop(s, DEAD, f"no data for {self._stall(s):.2g} s", now)
                continue
            if s.sample_start is not None and now - s.sample_start >= cfg.measure_interval:
                measured = s.sample_bytes / (now - s.sample_start)
                s.sample_start, s.sample_bytes = now, 0
                self._rates.observe(s.name, measured, now)
                new = max(self._rates.rate(s.name), 1.0)
                if abs(new - s.plan_rate) > cfg.replan_change * s.plan_rate:
                    slow = measured < cfg.slow_ratio * s.plan_rate
                    self._events.append((now, s.name, f"rate {s.plan_rate:.0f} -> {new:.0f} B/s"))
                    s.plan_rate = new
                    replan = True
                    if slow:
                        actions += self._move_flights(s, now)
        if replan:
            self._replan(now)
        actions += self._pump(now)
        return actions

    def check(self) -> None:
        """Raise ``StuckError`` if some chunk has no live holder left."""
        if self.stuck:
            first = min(self.stuck)
            raise StuckError(
                f"{len(self.stuck)} chunks (first: {first}) are held by no live source; "
                "add a source that holds them (--from)"
            )

    def report(self) -> Report:
        return Report(
            bytes_wire=sum(s.bytes_wire for s in self._src.values()),
            duplicate_bytes=self._dup,
            rejected_bytes=self._rejected,
            sources={
                s.name: SourceReport(
                    s.state, s.reason, s.bytes_wire, s.bytes_ok, s.chunks_ok, s.busy_time
                )
                for s in self._src.values()
            },
            events=list(self._events),
        )

    def chunk_size(self, chunk: int) -> int:
        return self._chunks[chunk].size

    def in_flight(self, source: str) -> list[int]:
        return list(self._src[source].flights)

    # --------------------------------------------------------------- planning

    def _live_holders(self, chunk: int) -> list[SourceState]:
        return [
            self._src[h]
            for h in self._holders[chunk]
            if h in self._src and self._src[h].state == LIVE
        ]

    def _holders_or_revived(self, chunk: int, now: float) -> list[SourceState]:
        """The live holders of ``chunk``; if none, the stalled ones get another chance."""
        live = self._live_holders(chunk)
        if live:
            return live
        for h in self._holders[chunk]:
            s = self._src.get(h)
            if s is not None and s.stalled and s.revivals < self.config.max_revivals:
                s.state, s.reason, s.stalled = LIVE, "", False
                s.revivals += 1
                s.stall_timeout *= 2
                self._events.append(
                    (now, s.name, f"revived: the only holder left (stall timeout now "
                     f"{s.stall_timeout:g} s)")
                )  # fmt: skip
        return self._live_holders(chunk)

    def _assign(self, chunks: Iterable[int], now: float) -> None:
        todo = [c for c in chunks if c not in self._done]
        holders = {c: self._holders_or_revived(c, now) for c in todo}
        todo.sort(key=lambda c: (len(holders[c]), c))
        backlog = {s.name: float(s.backlog()) for s in self._src.values()}
        for c in todo:
            cands = holders[c]
            if not cands:
                self.stuck.add(c)
                continue
            size = self._chunks[c].size
            best = min(cands, key=lambda s: (backlog[s.name] + size) / s.plan_rate)
            best.queue.append(c)
            best.queued_bytes += size
            backlog[best.name] += size
            self._queued_at[c] = best.name

    def _replan(self, now: float) -> None:
        queued: list[int] = []
        for s in self._src.values():
            queued += s.queue
            s.queue.clear()
            s.queued_bytes = 0
        for c in queued:
            self._queued_at.pop(c, None)
        self._assign(queued, now)

    def _window(self, s: SourceState) -> int:
        cfg = self.config
        want = math.ceil(s.plan_rate * s.rtt / self._piece) + 1
        return max(cfg.min_window, min(cfg.max_window, want))

    def _pump(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if not self._started:
            return actions
        for s in sorted(self._src.values(), key=lambda s: -s.plan_rate):
            if s.state != LIVE:
                continue
            window = self._window(s)
            while len(s.flights) < window:
                if not s.queue and not self._steal(s):
                    break
                c = s.queue.popleft()
                s.queued_bytes -= self._chunks[c].size
                del self._queued_at[c]
                actions.append(self._issue(s, c, now, endgame=False))
            if len(s.flights) < window and not s.queue:
                actions += self._endgame(s, now)
        return actions

    def _issue(self, s: SourceState, c: int, now: float, endgame: bool) -> Request:
        if not s.flights:
            s.deadline = now + s.rtt + self._stall(s)
            s.busy_since = now
        s.flights[c] = Flight(self._chunks[c].size, now, endgame=endgame)
        return Request(s.name, c)

    def _stall(self, s: SourceState) -> float:
        """How long ``s`` may send nothing with requests in flight before it is dead."""
        n = max(len(s.flights), self._window(s))  # the replies that share its link
        pieces = self.config.stall_pieces * n * self._piece
        t = max(s.stall_timeout, pieces / s.plan_rate)
        # Before its first byte its rate is only the prior's guess: twice the time.
        return t if s.bytes_wire or not self.config.stall_pieces else 2 * t

    def _finish_time(self, s: SourceState, extra: int = 0) -> float:
        return (s.backlog() + extra) / s.plan_rate

    def _steal(self, thief: SourceState) -> bool:
        victims = [v for v in self._src.values() if v is not thief and v.state == LIVE and v.queue]
        victims.sort(key=lambda v: -self._finish_time(v))
        for v in victims:
            moved = False
            for c in reversed(list(v.queue)):
                if thief.name not in self._holders[c]:
                    continue
                size = self._chunks[c].size
                if self._finish_time(thief, size) >= self._finish_time(v):
                    break
                v.queue.remove(c)
                v.queued_bytes -= size
                thief.queue.appendleft(c)
                thief.queued_bytes += size
                self._queued_at[c] = thief.name
                moved = True
            if moved:
                return True
        return False

    def _endgame(self, s: SourceState, now: float) -> list[Action]:
        best: tuple[float, int] | None = None
        for other in self._src.values():
            if other is s or other.state != LIVE:
                continue
            ahead = 0
            for c, f in other.flights.items():
                ahead += f.size - min(f.received, f.size)
                if c in s.flights or s.name not in self._holders[c]:
                    continue
                there = ahead / other.plan_rate
                here = s.rtt + self._finish_time(s, f.size)
                if here < self.config.endgame_gain * there and (best is None or there > best[0]):
                    best = (there, c)
        if best is None:
            return []
        c = best[1]
        size = self._chunks[c].size
        if self._endgame_bytes + size > self._budget:
            return []
        self._endgame_bytes += size
        return [self._issue(s, c, now, endgame=True)]

    def _move_flights(self, s: SourceState, now: float) -> list[Action]:
        """A slow source's in-flight chunks go where they would finish sooner."""
        actions: list[Action] = []
        ahead = 0
        moved: list[int] = []
        for c, f in list(s.flights.items()):
            ahead += f.size - min(f.received, f.size)
            others = [o for o in self._live_holders(c) if o is not s]
            if not others:
                continue
            here = ahead / s.plan_rate
            there = min(o.rtt + self._finish_time(o, f.size) for o in others)
            if there < self.config.endgame_gain * here:
                del s.flights[c]
                self._dup += f.received
                actions.append(Cancel(s.name, c))
                moved.append(c)
        self._idle_check(s, now)
        if moved:
            self._events.append((now, s.name, f"slow: moved {len(moved)} chunks in flight"))
            self._assign(moved, now)
        return actions

    # ---------------------------------------------------------------- failures

    def _exclude(self, s: SourceState, reason: str, now: float) -> list[Action]:
        if s.state != LIVE:
            return self._pump(now)
        return [Exclude(s.name, reason), *self._drop(s, EXCLUDED, reason, now)]

    def _drop(self, s: SourceState, state: str, reason: str, now: float) -> list[Action]:
        s.state, s.reason = state, reason
        actions: list[Action] = [Cancel(s.name, c) for c in s.flights]
        work = [*s.flights, *s.queue]
        for f in s.flights.values():
            if state == EXCLUDED:
                self._rejected += f.received
            else:
                self._dup += f.received
        s.flights.clear()
        s.queue.clear()
        s.queued_bytes = 0
        self._idle_check(s, now)
        for c in work:
            self._queued_at.pop(c, None)
        pending = [c for c in work if c not in self._done and not self._flying(c)]
        self._events.append((now, s.name, f"{state}: {reason}; moved {len(pending)} chunks"))
        self._assign(pending, now)
        # Chunks queued elsewhere that only this source held are stuck too.
        for c, owner in list(self._queued_at.items()):
            if not self._holders_or_revived(c, now):
                src = self._src[owner]
                src.queue.remove(c)
                src.queued_bytes -= self._chunks[c].size
                del self._queued_at[c]
                self.stuck.add(c)
        return actions + self._pump(now)

    def _flying(self, c: int) -> bool:
        return any(c in s.flights for s in self._src.values() if s.state == LIVE)

    def _waste(self, s: SourceState, nbytes: int) -> None:
        if s.state == EXCLUDED:
            self._rejected += nbytes
        else:
            self._dup += nbytes

    def _idle_check(self, s: SourceState, now: float) -> None:
        if not s.flights and s.busy_since is not None:
            s.busy_time += now - s.busy_since
            s.busy_since = None
            s.sample_start = None
