"""The scheduler's vocabulary: chunks, actions, and the two things it asks the world.

The scheduler does not know where rate predictions or chunk inventories come from. Two
small protocols stand for them, so the path predictor (``dwcp.pba``) and the gossip
inventory (``dwcp.gossip``) can plug in later without the scheduler changing:

- ``RateEstimator``: a pessimistic rate for a source, in bytes per second, and the
  measurements the scheduler makes while it pulls (so an estimator can learn from them).
- ``Holdings``: which sources hold which chunks.

The defaults here are what works with nothing else: ``EwmaRates`` (a prior, then an
exponentially weighted mean of measured rates) and ``ExplicitHoldings`` (the ``--from``
list: every listed source holds every chunk, unless told otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Chunk:
    """A unit of work: ``size`` bytes of the image at ``offset``, verified as a whole."""

    index: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Request:
    """Ask ``source`` for ``chunk`` (pipelined behind what it already serves)."""

    source: str
    chunk: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop asking ``source`` for ``chunk``: another source delivered it, or it moved."""

    source: str
    chunk: int


@dataclass(frozen=True, slots=True)
class Exclude:
    """Never use ``source`` again in this transfer; ``reason`` says why (for the report)."""

    source: str
    reason: str


Action = Request | Cancel | Exclude


class RateEstimator(Protocol):
    """Rates of sources as the scheduler should plan with them (bytes per second)."""

    def rate(self, source: str) -> float:
        """A pessimistic rate (think P10): planning on it leaves the tail to stealing."""
        ...

    def observe(self, source: str, rate: float, now: float) -> None:
        """A rate the scheduler measured while ``source`` was busy for a while."""
        ...


class Holdings(Protocol):
    """Which sources hold which chunks (an inventory, possibly partial)."""

    def holders(self, chunk: int) -> frozenset[str]:
        """The sources that hold ``chunk``; empty means nobody does."""
        ...


class EwmaRates:
    """A prior per source, replaced by an exponentially weighted mean of measurements.

    Why EWMA with a large weight on the new sample: a source that slows down must be
    planned around within a couple of measurements, and the scheduler already smooths
    by measuring over intervals of busy time (not single chunks).
    """

    def __init__(self, prior: Mapping[str, float], alpha: float = 0.5) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], not {alpha}")
        self._rates = {s: float(r) for s, r in prior.items()}
        self._measured: set[str] = set()
        self._alpha = alpha

    def rate(self, source: str) -> float:
        return self._rates.get(source, 1.0)

    def observe(self, source: str, rate: float, now: float) -> None:
        if source not in self._measured:
            self._measured.add(source)
            self._rates[source] = rate
            return
        old = self._rates.get(source, rate)
        self._rates[source] = old + self._alpha * (rate - old)


class ExplicitHoldings:
    """Every source holds every chunk, except where a map says which chunks it holds."""

    def __init__(
        self, sources: Iterable[str], partial: Mapping[str, Iterable[int]] | None = None
    ) -> None:
        self._all = frozenset(sources)
        self._partial = {s: frozenset(c) for s, c in (partial or {}).items()}
        self._full = self._all - set(self._partial)

    def holders(self, chunk: int) -> frozenset[str]:
        return self._full | frozenset(s for s, cs in self._partial.items() if chunk in cs)


def split_chunks(total: int, piece: int) -> list[Chunk]:
    """``total`` bytes as chunks of ``piece`` bytes (the last one shorter)."""
    if piece <= 0:
        raise ValueError(f"piece size must be positive, not {piece}")
    return [Chunk(i, off, min(piece, total - off)) for i, off in enumerate(range(0, total, piece))]
