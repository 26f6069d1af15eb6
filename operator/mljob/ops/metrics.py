"""Prometheus metrics of the operator and the collector: every name and label set in one place.

Why one module: the chart's PrometheusRule, KEDA's query and docs/operations.md name these
series, so they must not drift apart; call sites record with one line each. Labels are bounded
sets (phase, pipeline, reason, cause, action, store, kind), never an item or job id, so the
series count does not grow with the work. Everything lives in prometheus-client's default
registry, so the in-process collector's series appear on the operator's `/metrics` too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mljob import protocol
from mljob.adapters.redis_state import RecordOutcome, RecordStatus
from mljob.api.models import Phase
from mljob.core.counts import ItemCounts

#: Error prefixes (`<Reason>: message`) of failures the operator or the collector decide.
DECIDED_REASONS = frozenset(
    {"MaxDeliveriesExceeded", "Lost", "DeadlineExceeded", "StreamLost", "ResultRejected"}
)
#: The reason of every other failure: the worker's handler failed the item (free text error).
HANDLER_FAILED = "HandlerFailed"
#: Phases whose pending items are queued work (the backlog KEDA scales workers on).
BACKLOG_PHASES = frozenset({Phase.DISPATCHING, Phase.RUNNING})

ITEMS_PROCESSED = Counter(
    "mljob_items_processed_total", "Items that got their outcome (succeeded or failed), each counted once"
)
ITEMS_FAILED = Counter("mljob_items_failed_total", "Items that got a failed outcome, by reason", ["reason"])
ITEMS_LOST = Counter(
    "mljob_items_lost_total",
    "Items whose task no worker answered, by cause (StreamRecreated: re-published; others: failed)",
    ["cause"],
)
TASKS_DISPATCHED = Counter("mljob_tasks_dispatched_total", "Tasks published to job streams at dispatch")
RECONCILE_SECONDS = Histogram(
    "mljob_reconcile_duration_seconds", "Duration of one reconcile tick of a job, by action", ["action"]
)
RECONCILE_ERRORS = Counter(
    "mljob_reconcile_errors_total", "Reconcile ticks that raised unexpectedly (the loop backs off)"
)
GUARD_REFUSALS = Counter(
    "mljob_guard_refusals_total",
    "Terminal or Canceling writes refused because another writer moved first, by store",
    ["store"],
)
CLEANUPS = Counter(
    "mljob_cleanups_total", "Cleanup runs (stream, registry entry, Redis keys) of finished or deleted jobs"
)
ORPHANS_REMOVED = Counter(
    "mljob_orphans_removed_total", "Resources of no live MLJob removed by the orphan sweep", ["kind"]
)
RESULTS_REFUSED = Counter(
    "mljob_results_refused_total", "Result messages the collector dead-lettered, by kind", ["kind"]
)
SCHEDULER_JOBS = Gauge("mljob_scheduler_jobs", "MLJobs in the operator's index (every one it watches)")
SCHEDULER_BUSY = Gauge("mljob_scheduler_busy", "MLJobs handed to a reconcile worker right now")
SCHEDULER_LATE = Gauge(
    "mljob_scheduler_late_seconds",
    "How long the most overdue MLJob has waited for a free reconcile worker (0: workers keep up)",
)
COLLECTOR_LAG = Gauge(
    "mljob_collector_lag_seconds",
    "Age of the oldest result of the latest batch when it was stored (0 when idle)",
)
COLLECTOR_BATCH = Histogram(
    "mljob_collector_batch_size",
    "Result messages per collector batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
#: 1 while this replica holds the leader Lease (it reconciles), 0 while it stands by (it watches).
LEADER = Gauge("mljob_leader", "1 while this operator replica leads (holds the Lease and reconciles), else 0")


def failure_reason(error: str | None) -> str:
    """The `reason` label of a failed item: its error's prefix when the operator or collector
    decided the failure, else HandlerFailed (a worker's error text is free and unbounded)."""
    prefix = (error or "").split(":", 1)[0].strip()
    return prefix if prefix in DECIDED_REASONS else HANDLER_FAILED


def label_value(text: str) -> str:
    """A short snake_case label value from a description such as "rejected by Postgres"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def count_recorded(results: Sequence[protocol.Result], outcomes: Sequence[RecordOutcome]) -> None:
    """The collector recorded `results` (in order, one outcome each): count the new outcomes."""
    for result, outcome in zip(results, outcomes, strict=True):
        if outcome.status is RecordStatus.NEW:
            ITEMS_PROCESSED.inc()
            if result.outcome is protocol.Outcome.FAILED:
                ITEMS_FAILED.labels(reason=failure_reason(result.error)).inc()


def items_failed_by_operator(reason: str, newly: int) -> None:
    """The operator failed `newly` items itself (no worker answered): processed, failed and lost."""
    if newly > 0:
        ITEMS_PROCESSED.inc(newly)
        ITEMS_FAILED.labels(reason=reason).inc(newly)
        ITEMS_LOST.labels(cause=reason).inc(newly)


def collector_lag(results: Sequence[protocol.Result], now: float | None = None) -> None:
    """Now minus the oldest `finished_at` of a stored batch (clamped at 0: worker clocks drift)."""
    if results:
        oldest = min(r.finished_at.timestamp() for r in results)
        COLLECTOR_LAG.set(max(0.0, (time.time() if now is None else now) - oldest))


def started() -> float:
    """The start of a timed tick (a monotonic clock, immune to the tests' patched wall clock)."""
    return time.monotonic()


@contextmanager
def reconcile_timer(action: str, started: float) -> Iterator[None]:
    """Observe a tick from `started()` to the end of its action, raised or not."""
    try:
        yield
    finally:
        RECONCILE_SECONDS.labels(action=str(action)).observe(time.monotonic() - started)


class JobTable(Collector):
    """`mljob_jobs{phase}` and `mljob_backlog{pipeline}`, computed at scrape time from what each
    job's loop last saw: a gauge per job would be one series per job, this is one per phase and
    per pipeline. Every phase is exported (0 too), and a pipeline stays until its jobs are gone,
    so "went to 0" is visible."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[str, str, int]] = {}

    def track(self, uid: str, phase: Phase | None, pipeline: str, counts: ItemCounts | None) -> None:
        shown = phase or Phase.PENDING
        backlog = counts.pending if counts is not None and shown in BACKLOG_PHASES else 0
        self._jobs[uid] = (shown.value, pipeline, backlog)

    def forget(self, uid: str) -> None:
        self._jobs.pop(uid, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("mljob_jobs", "MLJobs this operator runs, by phase", labels=["phase"])
        by_phase = dict.fromkeys((p.value for p in Phase), 0)
        backlog = GaugeMetricFamily(
            "mljob_backlog",
            "Items without an outcome of Dispatching/Running jobs, by pipeline",
            labels=["pipeline"],
        )
        by_pipeline: dict[str, int] = {}
        for phase, pipeline, pending in list(self._jobs.values()):
            by_phase[phase] = by_phase.get(phase, 0) + 1
            by_pipeline[pipeline] = by_pipeline.get(pipeline, 0) + pending
        for phase, count in sorted(by_phase.items()):
            jobs.add_metric([phase], count)
        for pipeline, pending in sorted(by_pipeline.items()):
            backlog.add_metric([pipeline], pending)
        yield jobs
        yield backlog


JOBS = JobTable()
REGISTRY.register(JOBS)
