"""ITP, intelligent task partitioning: one transfer pulled from many sources at once.

- ``dwcp.itp.model``: chunks, actions, and the protocols for rate estimates and chunk
  inventories (with defaults: measured EWMA, an explicit --from list).
- ``dwcp.itp.scheduler``: the sans-IO receiver-driven scheduler (its records in ``state``).
- ``dwcp.itp.bound``: the ideal makespan T* to judge a schedule by.
- ``dwcp.itp.sim``: a seeded virtual-time simulator of sources for tests and benchmarks.
"""

from __future__ import annotations

from dwcp.itp.bound import RateProfile, bound, bound_profiles
from dwcp.itp.model import (
    Action,
    Cancel,
    Chunk,
    EwmaRates,
    Exclude,
    ExplicitHoldings,
    Holdings,
    RateEstimator,
    Request,
    split_chunks,
)
from dwcp.itp.scheduler import Config, Report, Scheduler, SourceReport, StuckError

__all__ = [
    "Action",
    "Cancel",
    "Chunk",
    "Config",
    "EwmaRates",
    "Exclude",
    "ExplicitHoldings",
    "Holdings",
    "RateEstimator",
    "RateProfile",
    "Report",
    "Request",
    "Scheduler",
    "SourceReport",
    "StuckError",
    "bound",
    "bound_profiles",
    "split_chunks",
]
