"""Reconcile decisions: pure functions from an observed snapshot to what should happen next.

The shell (mljob.lifecycle) observes Kubernetes, Redis and Postgres, calls `decide`, and
carries out the returned plan. Keeping every choice here makes each one testable in a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.core.counts import Completeness, ItemCounts, completeness


class Action(StrEnum):
    DISPATCH = "dispatch"  # (re)load items, write state, publish from the cursor
    PROGRESS = "progress"  # mirror counts into the status (only if something changed)
    FINISH = "finish"  # guarded terminal transition in Postgres, then the CR
    STATE_MISSING = "state-missing"  # Redis lost the job's state: report, never finish
    CLEANUP = "cleanup"  # terminal already: make sure streams/keys/registry are gone


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    reason: str
    message: str


@dataclass(frozen=True)
class Snapshot:
    """What the shell observed, in one place."""

    phase: Phase | None
    cancel: bool
    failure_threshold: float
    dispatched: int
    total: int | None
    counts: ItemCounts | None


@dataclass(frozen=True)
class Plan:
    action: Action
    verdict: Verdict | None = None
    status: dict[str, Any] = field(default_factory=dict)


def verdict(total: int, failed: int, threshold: float) -> Verdict:
    """Succeeded or Failed on exact counts: Failed when failed/total exceeds the threshold."""
    if total > 0 and failed / total > threshold:
        return Verdict(
            Phase.FAILED,
            "FailureThresholdExceeded",
            f"{failed} of {total} items failed ({failed / total:.0%}), above the failure threshold "
            f"of {threshold:.0%}",
        )
    if failed:
        return Verdict(
            Phase.SUCCEEDED,
            "CompletedWithFailures",
            f"{total - failed} of {total} items succeeded, {failed} failed",
        )
    return Verdict(Phase.SUCCEEDED, "Completed", f"all {total} items succeeded")


def progress_percent(processed: int, total: int) -> str:
    """Floor, so 100% is shown only when every item is processed."""
    if total <= 0:
        return "0%"
    return f"{processed * 100 // total}%"


def progress_fields(counts: ItemCounts, dispatched: int) -> dict[str, Any]:
    return {
        "total": counts.total,
        "dispatched": dispatched,
        "processed": counts.processed,
        "failed": counts.failed,
        "pending": counts.pending,
        "progress": progress_percent(counts.processed, counts.total),
    }


def status_delta(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Only the fields that differ: an idle tick yields {} and therefore no write."""
    return {key: value for key, value in desired.items() if current.get(key) != value}


def decide(snapshot: Snapshot) -> Plan:
    if snapshot.phase in TERMINAL_PHASES:
        return Plan(Action.CLEANUP)
    if snapshot.cancel:
        return Plan(Action.FINISH, Verdict(Phase.CANCELLED, "Cancelled", "spec.cancel was set"))
    if snapshot.phase in (None, Phase.PENDING, Phase.DISPATCHING) or (
        snapshot.total is not None and snapshot.dispatched < snapshot.total
    ):
        return Plan(Action.DISPATCH)
    state = completeness(snapshot.counts)
    if state is Completeness.STATE_MISSING or snapshot.counts is None:
        return Plan(Action.STATE_MISSING)
    fields = progress_fields(snapshot.counts, snapshot.dispatched)
    if state is Completeness.COMPLETE:
        return Plan(
            Action.FINISH,
            verdict(snapshot.counts.total, snapshot.counts.failed, snapshot.failure_threshold),
            fields,
        )
    return Plan(Action.PROGRESS, status=fields)
