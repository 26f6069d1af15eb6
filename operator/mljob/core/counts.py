"""Per-job item counts as observed in Redis, the authoritative per-item state."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class ItemCounts:
    """One consistent read of a job's item state: processed = total - pending."""

    total: int
    pending: int
    failed: int
    last_activity: float | None = None  # unix seconds of the last recorded result

    @property
    def processed(self) -> int:
        return self.total - self.pending

    @property
    def succeeded(self) -> int:
        return self.processed - self.failed


class Completeness(StrEnum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    STATE_MISSING = "state-missing"


def completeness(counts: ItemCounts | None) -> Completeness:
    """Tri-state: missing state is never mistaken for a finished job (failure-modes row 8)."""
    if counts is None:
        return Completeness.STATE_MISSING
    return Completeness.COMPLETE if counts.pending == 0 else Completeness.INCOMPLETE
