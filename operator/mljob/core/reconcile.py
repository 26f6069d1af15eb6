"""Reconcile decisions: pure functions from an observed snapshot to what should happen next.

The shell (mljob.controller.loop and the modules in mljob.controller.actions) observes Kubernetes, Redis,
NATS and Postgres, calls `decide`, and carries out the returned plan. Every fact a decision
uses, the clock included, is in the `Snapshot`, so each choice is testable in a table.

Order matters and is part of the contract:
1. a terminal job is only cleaned up (and deleted once its TTL ran out);
2. cancel beats everything else that is not terminal;
3. a running job whose every item has an outcome finishes on exact counts;
4. the deadline beats dispatch and progress;
5. dispatch runs until every item is published;
6. missing Redis state is rebuilt, never read as complete (failure-modes rows 8, 12);
7. a missing stream or consumer is recreated and the pending items re-dispatched, a bounded
   number of times (row 11); a consumer whose server has not answered for
   `consumer_replace_seconds` is replaced under a new name;
8. no activity for the stall timeout: items that were all delivered are lost and fail; items
   never delivered wait for workers, reported by a condition (row 5). Never decided from
   `num_ack_pending` (row 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.core.counts import ItemCounts


class Action(StrEnum):
    DISPATCH = "dispatch"  # (re)load items, write state, publish from the cursor
    PROGRESS = "progress"  # mirror counts into the status (only if something changed)
    FINISH = "finish"  # guarded terminal transition in Postgres, then the CR
    REBUILD_STATE = "rebuild-state"  # Redis lost the job's state: rebuild it from the ledger
    REDISPATCH = "redispatch"  # stream or consumer gone: recreate, publish what has no result
    REPLACE_CONSUMER = "replace-consumer"  # the consumer's server stopped answering: a new consumer
    FAIL_PENDING = "fail-pending"  # fail every item without an outcome, then finish
    WAIT_FOR_WORKERS = "wait-for-workers"  # stalled with undelivered items: say so, fail nothing
    CANCEL = "cancel"  # Canceling (guarded), clean up, then Cancelled
    CLEANUP = "cleanup"  # terminal already: make sure streams/keys/registry are gone
    DELETE = "delete"  # terminal and ttlSecondsAfterFinished has passed: delete the MLJob


class FailReason(StrEnum):
    LOST = "Lost"
    DEADLINE = "DeadlineExceeded"
    STREAM_LOST = "StreamLost"


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    reason: str
    message: str


@dataclass(frozen=True)
class StreamView:
    """The job's stream and consumer as NATS reports them (None in the snapshot: not observed)."""

    stream_exists: bool
    consumer_exists: bool
    #: messages the consumer has not delivered even once (undelivered work)
    num_pending: int = 0
    num_redelivered: int = 0
    num_ack_pending: int = 0  # reported in diagnostics only, never decided on (row 3)
    last_delivery: float | None = None  # unix seconds of the consumer's last delivery
    #: False: the stream answered and the consumer did not (a one-replica consumer whose NATS
    #: server is down); its counters above are then unknown
    consumer_answers: bool = True


@dataclass(frozen=True)
class Snapshot:
    """What the shell observed, in one place, with the clock."""

    phase: Phase | None
    cancel: bool
    failure_threshold: float
    dispatched: int
    total: int | None
    counts: ItemCounts | None
    now: float = 0.0
    start_time: float | None = None
    completion_time: float | None = None
    #: the latest of: a result recorded, a worker heartbeat, a delivery, this operator starting
    #: to watch the job (a restart never counts as a stall)
    last_activity: float | None = None
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    stall_timeout_seconds: int = 600
    stream: StreamView | None = None
    stream_recreations: int = 0
    max_stream_recreations: int = 3
    #: a recreation was begun (counted, `StreamAvailable=False`) and not yet seen through
    stream_recreation_pending: bool = False
    #: since when (unix seconds) every look at the consumer found it not answering; None: it answered
    consumer_silent_since: float | None = None
    #: a consumer silent this long is replaced (its server is taken as lost)
    consumer_replace_seconds: float = 120.0
    #: `StateAvailable=False`: a finish or rebuild found no items in the ledger to work from, and
    #: only a change in Redis or the ledger can move the job
    state_unavailable: bool = False


@dataclass(frozen=True)
class Plan:
    action: Action
    verdict: Verdict | None = None
    status: dict[str, Any] = field(default_factory=dict)
    fail_reason: FailReason | None = None
    message: str = ""
    #: the action found nothing to work from last time (`Snapshot.state_unavailable`): doing it
    #: again with nothing changed is a quiet tick, not progress
    blocked: bool = False


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


def ledger_agrees(decided_on: ItemCounts, ledger: ItemCounts) -> bool:
    """Whether a verdict decided on `decided_on` (Redis's copy) stands on the ledger's counts: the
    ledger has an outcome for every item, and the same items and failures."""
    return ledger.pending == 0 and (ledger.total, ledger.failed) == (decided_on.total, decided_on.failed)


def status_delta(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Only the fields that differ: an idle tick yields {} and therefore no write."""
    return {key: value for key, value in desired.items() if current.get(key) != value}


def deadline_passed(s: Snapshot) -> bool:
    if s.active_deadline_seconds is None or s.start_time is None:
        return False
    return s.now >= s.start_time + s.active_deadline_seconds


def ttl_expires_at(s: Snapshot) -> float | None:
    """When a finished job's MLJob is to be deleted (None: never)."""
    if s.ttl_seconds_after_finished is None or s.completion_time is None:
        return None
    return s.completion_time + s.ttl_seconds_after_finished


def consumer_lost(s: Snapshot) -> bool:
    """The job's consumer has not answered for `consumer_replace_seconds`, while its stream did."""
    return (
        s.stream is not None
        and not s.stream.consumer_answers
        and s.consumer_silent_since is not None
        and s.now - s.consumer_silent_since >= s.consumer_replace_seconds
    )


def silent_since(
    previous: float | None, stream: StreamView | None, counts_changed: bool, now: float
) -> float | None:
    """Since when the job's consumer has not answered, after this tick's look (None: it answered,
    or the job's counts moved, which only a working consumer makes them do). Not looked at this
    tick: as before."""
    if counts_changed or (stream is not None and stream.consumer_answers):
        return None
    if stream is None:
        return previous
    return previous if previous is not None else now


def stalled(s: Snapshot) -> bool:
    return s.last_activity is not None and s.now - s.last_activity >= s.stall_timeout_seconds


def decide(s: Snapshot) -> Plan:
    if s.phase in TERMINAL_PHASES:
        expires = ttl_expires_at(s)
        if expires is not None and s.now >= expires:
            return Plan(Action.DELETE)
        return Plan(Action.CLEANUP)
    if s.cancel or s.phase is Phase.CANCELING:
        return Plan(Action.CANCEL, Verdict(Phase.CANCELLED, "Cancelled", "spec.cancel was set"))
    if s.phase is Phase.RUNNING and s.counts is not None and s.counts.pending == 0:
        # Every item has an outcome: the exact counts decide, even if the deadline passed since.
        return _finish(s, s.counts)
    if deadline_passed(s):
        message = f"the job ran longer than activeDeadlineSeconds ({s.active_deadline_seconds}s)"
        return Plan(
            Action.FAIL_PENDING,
            Verdict(Phase.FAILED, FailReason.DEADLINE.value, message),
            fail_reason=FailReason.DEADLINE,
            message=message,
        )
    if s.phase in (None, Phase.PENDING, Phase.DISPATCHING) or (
        s.total is not None and s.dispatched < s.total
    ):
        return Plan(Action.DISPATCH)
    if s.counts is None:
        return Plan(Action.REBUILD_STATE, blocked=s.state_unavailable)
    fields = progress_fields(s.counts, s.dispatched)
    if s.stream_recreation_pending and s.counts.pending:
        return Plan(Action.REDISPATCH, status=fields)  # carry a begun recreation through
    if s.counts.pending == 0:
        return _finish(s, s.counts)
    if consumer_lost(s):
        return Plan(Action.REPLACE_CONSUMER, status=fields)
    if s.stream is not None and not (s.stream.stream_exists and s.stream.consumer_exists):
        if s.stream_recreations < s.max_stream_recreations:
            return Plan(Action.REDISPATCH, status=fields)
        message = (
            f"the job's stream was lost {s.stream_recreations + 1} times; "
            f"re-dispatched at most {s.max_stream_recreations} times"
        )
        return Plan(
            Action.FAIL_PENDING,
            Verdict(Phase.FAILED, FailReason.STREAM_LOST.value, message),
            fail_reason=FailReason.STREAM_LOST,
            message=message,
        )
    if stalled(s) and s.stream is not None and s.stream.consumer_answers:  # silent: counters unknown
        if s.stream.num_pending == 0:
            message = (
                f"no activity for {s.stall_timeout_seconds}s and every task was delivered at least "
                f"once: the {s.counts.pending} unfinished items are lost (consumer: "
                f"{s.stream.num_redelivered} redelivered, {s.stream.num_ack_pending} awaiting ack)"
            )
            # The verdict is decided on the exact counts once the lost items are failed.
            return Plan(Action.FAIL_PENDING, None, fields, fail_reason=FailReason.LOST, message=message)
        message = (
            f"no activity for {s.stall_timeout_seconds}s; {s.stream.num_pending} of {s.counts.total} "
            f"tasks were never delivered: no worker is pulling pipeline tasks"
        )
        return Plan(Action.WAIT_FOR_WORKERS, status=fields, message=message)
    return Plan(Action.PROGRESS, status=fields)


def _finish(s: Snapshot, counts: ItemCounts) -> Plan:
    fields = progress_fields(counts, s.dispatched)
    outcome = verdict(counts.total, counts.failed, s.failure_threshold)
    return Plan(Action.FINISH, outcome, fields, blocked=s.state_unavailable)


def needs_stream_view(s: Snapshot, counts_changed: bool) -> bool:
    """Whether the shell should ask NATS about the stream this tick (a round trip).

    A job whose counts moved since the last tick is alive; only a quiet one is checked, so a
    busy operator does not pay one NATS request per job per tick.
    """
    if s.phase is not Phase.RUNNING or s.counts is None or s.counts.pending == 0:
        return False
    return not counts_changed


def next_tick(s: Snapshot, quiet_ticks: int, base: float, ceiling: float) -> float:
    """Seconds until the loop looks at the job again (results and exhausted items wake it sooner).

    A job whose counts move is looked at every `base` seconds; a quiet one less and less often,
    doubling per quiet tick up to `ceiling`, so ten thousand idle MLJobs cost the operator little.
    The checks keep their resolution: never longer than a quarter of the stall timeout, and the
    deadline is looked at when it passes.
    """
    sleep = min(max(base, ceiling), base * (1 << min(quiet_ticks, 30)))
    sleep = min(sleep, max(base, s.stall_timeout_seconds / 4))
    if s.active_deadline_seconds is not None and s.start_time is not None:
        left = s.start_time + s.active_deadline_seconds - s.now
        sleep = min(sleep, max(base, left))
    return sleep


def is_quiet(plan: Plan, counts_changed: bool) -> bool:
    """A tick that found a running job as it was: nothing to do but look again later. So is a
    blocked finish or rebuild (the ledger has no items to work from) while nothing changes: it
    backs off like an idle job instead of retrying every interval forever."""
    if counts_changed:
        return False
    return plan.action in (Action.PROGRESS, Action.WAIT_FOR_WORKERS) or plan.blocked
