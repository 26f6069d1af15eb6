"""Reconcile decisions and item rules, table-driven: pure functions, no services."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from mljob.api.models import Phase
from mljob.core import items
from mljob.core.conditions import same_conditions, set_condition
from mljob.core.counts import Completeness, ItemCounts, completeness
from mljob.core.reconcile import (
    Action,
    Snapshot,
    StreamView,
    decide,
    ledger_agrees,
    needs_stream_view,
    progress_percent,
    silent_since,
    status_delta,
    verdict,
)

pytestmark = pytest.mark.unit


NOW = 1_000_000.0
ALIVE = StreamView(stream_exists=True, consumer_exists=True, num_pending=0)
UNDELIVERED = StreamView(stream_exists=True, consumer_exists=True, num_pending=4)
NO_STREAM = StreamView(stream_exists=False, consumer_exists=False)
NO_CONSUMER = StreamView(stream_exists=True, consumer_exists=False)
SILENT = StreamView(stream_exists=True, consumer_exists=True, consumer_answers=False)


def snap(
    phase: Phase | None = Phase.RUNNING,
    counts: ItemCounts | None = None,
    *,
    cancel: bool = False,
    dispatched: int = 10,
    total: int | None = 10,
    threshold: float = 0.5,
    idle: float = 0.0,
    stall: int = 600,
    stream: StreamView | None = None,
    deadline: int | None = None,
    started_ago: float = 100.0,
    ttl: int | None = None,
    finished_ago: float | None = None,
    recreations: int = 0,
    silent_for: float | None = None,
) -> Snapshot:
    return Snapshot(
        phase=phase,
        cancel=cancel,
        failure_threshold=threshold,
        dispatched=dispatched,
        total=total,
        counts=counts,
        now=NOW,
        start_time=NOW - started_ago,
        completion_time=None if finished_ago is None else NOW - finished_ago,
        last_activity=NOW - idle,
        active_deadline_seconds=deadline,
        ttl_seconds_after_finished=ttl,
        stall_timeout_seconds=stall,
        stream=stream,
        stream_recreations=recreations,
        max_stream_recreations=3,
        consumer_silent_since=None if silent_for is None else NOW - silent_for,
        consumer_replace_seconds=120.0,
    )


HALF = ItemCounts(10, 5, 0)


@pytest.mark.parametrize(
    ("snapshot", "action", "verdict_phase", "fail_reason"),
    [
        # terminal: cleanup, then delete once the TTL has passed
        (snap(Phase.SUCCEEDED, ItemCounts(10, 0, 0)), Action.CLEANUP, None, None),
        (snap(Phase.CANCELLED), Action.CLEANUP, None, None),
        (snap(Phase.FAILED, None), Action.CLEANUP, None, None),
        (snap(Phase.SUCCEEDED, ttl=10, finished_ago=5), Action.CLEANUP, None, None),
        (snap(Phase.SUCCEEDED, ttl=10, finished_ago=10), Action.DELETE, None, None),
        (snap(Phase.FAILED, ttl=0, finished_ago=0), Action.DELETE, None, None),
        # cancel wins over everything non-terminal, and Canceling carries on cancelling
        (snap(Phase.RUNNING, HALF, cancel=True), Action.CANCEL, Phase.CANCELLED, None),
        (snap(Phase.DISPATCHING, HALF, cancel=True, dispatched=3), Action.CANCEL, Phase.CANCELLED, None),
        (snap(Phase.CANCELING, None), Action.CANCEL, Phase.CANCELLED, None),
        (snap(Phase.RUNNING, HALF, cancel=True, deadline=1), Action.CANCEL, Phase.CANCELLED, None),
        # dispatch
        (snap(None, None, dispatched=0, total=None), Action.DISPATCH, None, None),
        (snap(Phase.PENDING, None, dispatched=0, total=None), Action.DISPATCH, None, None),
        (snap(Phase.DISPATCHING, ItemCounts(10, 10, 0), dispatched=4), Action.DISPATCH, None, None),
        # deadline: beats dispatch and progress, fails the job
        (
            snap(Phase.RUNNING, HALF, deadline=100, started_ago=100),
            Action.FAIL_PENDING,
            Phase.FAILED,
            "DeadlineExceeded",
        ),
        (
            snap(Phase.DISPATCHING, HALF, deadline=5, dispatched=2),
            Action.FAIL_PENDING,
            Phase.FAILED,
            "DeadlineExceeded",
        ),
        (snap(Phase.RUNNING, None, deadline=5), Action.FAIL_PENDING, Phase.FAILED, "DeadlineExceeded"),
        (snap(Phase.RUNNING, HALF, deadline=101, started_ago=100), Action.PROGRESS, None, None),
        # every outcome in before the deadline was observed: the counts decide, not the deadline
        (snap(Phase.RUNNING, ItemCounts(10, 0, 2), deadline=5), Action.FINISH, Phase.SUCCEEDED, None),
        (snap(Phase.RUNNING, ItemCounts(10, 0, 6), deadline=5), Action.FINISH, Phase.FAILED, None),
        # row 8/12: missing state is rebuilt, never complete
        (snap(Phase.RUNNING, None), Action.REBUILD_STATE, None, None),
        (snap(Phase.RUNNING, None, stream=NO_STREAM, idle=10_000), Action.REBUILD_STATE, None, None),
        # finish on exact counts
        (snap(Phase.RUNNING, ItemCounts(10, 3, 1)), Action.PROGRESS, None, None),
        (snap(Phase.RUNNING, ItemCounts(10, 0, 0)), Action.FINISH, Phase.SUCCEEDED, None),
        (
            snap(Phase.RUNNING, ItemCounts(10, 0, 5)),
            Action.FINISH,
            Phase.SUCCEEDED,
            None,
        ),  # 50% is not above 50%
        (snap(Phase.RUNNING, ItemCounts(10, 0, 6)), Action.FINISH, Phase.FAILED, None),
        (snap(Phase.RUNNING, ItemCounts(10, 0, 1), threshold=0.0), Action.FINISH, Phase.FAILED, None),
        (snap(Phase.RUNNING, ItemCounts(10, 0, 0), stream=NO_STREAM), Action.FINISH, Phase.SUCCEEDED, None),
        # row 11: a lost stream or consumer is recreated, a bounded number of times
        (snap(Phase.RUNNING, HALF, stream=NO_STREAM), Action.REDISPATCH, None, None),
        (snap(Phase.RUNNING, HALF, stream=NO_CONSUMER), Action.REDISPATCH, None, None),
        (snap(Phase.RUNNING, HALF, stream=NO_STREAM, recreations=2), Action.REDISPATCH, None, None),
        (
            snap(Phase.RUNNING, HALF, stream=NO_STREAM, recreations=3),
            Action.FAIL_PENDING,
            Phase.FAILED,
            "StreamLost",
        ),
        # a recreation begun but not seen through (crash or error halfway) is carried through
        (
            replace(snap(Phase.RUNNING, HALF, recreations=1), stream_recreation_pending=True),
            Action.REDISPATCH,
            None,
            None,
        ),
        (
            replace(snap(Phase.RUNNING, ItemCounts(10, 0, 0), recreations=1), stream_recreation_pending=True),
            Action.FINISH,
            Phase.SUCCEEDED,
            None,
        ),
        # a consumer whose server stopped answering: waited for, then replaced under a new name
        (snap(Phase.RUNNING, HALF, stream=SILENT, silent_for=119), Action.PROGRESS, None, None),
        (snap(Phase.RUNNING, HALF, stream=SILENT, silent_for=120), Action.REPLACE_CONSUMER, None, None),
        (snap(Phase.RUNNING, HALF, stream=ALIVE, silent_for=500), Action.PROGRESS, None, None),  # answers now
        (
            snap(Phase.RUNNING, HALF, stream=None, silent_for=500),
            Action.PROGRESS,
            None,
            None,
        ),  # not looked at
        # its counters are unknown: a stall is never taken for lost items while it is silent
        (snap(Phase.RUNNING, HALF, stream=SILENT, silent_for=60, idle=700), Action.PROGRESS, None, None),
        (
            snap(Phase.RUNNING, ItemCounts(10, 0, 0), stream=SILENT, silent_for=500),
            Action.FINISH,
            Phase.SUCCEEDED,
            None,
        ),
        (
            snap(Phase.RUNNING, HALF, stream=SILENT, silent_for=500, cancel=True),
            Action.CANCEL,
            Phase.CANCELLED,
            None,
        ),
        (
            snap(Phase.RUNNING, HALF, stream=SILENT, silent_for=500, deadline=50),
            Action.FAIL_PENDING,
            Phase.FAILED,
            "DeadlineExceeded",
        ),
        # row 5: stalls; the threshold decides, and never num_ack_pending (row 3)
        (snap(Phase.RUNNING, HALF, stream=ALIVE, idle=599), Action.PROGRESS, None, None),
        (snap(Phase.RUNNING, HALF, stream=ALIVE, idle=600), Action.FAIL_PENDING, None, "Lost"),
        (
            snap(
                Phase.RUNNING, HALF, idle=600, stream=StreamView(True, True, num_pending=0, num_ack_pending=5)
            ),
            Action.FAIL_PENDING,
            None,
            "Lost",
        ),
        (
            snap(
                Phase.RUNNING, HALF, idle=600, stream=StreamView(True, True, num_pending=0, num_ack_pending=0)
            ),
            Action.FAIL_PENDING,
            None,
            "Lost",
        ),
        (snap(Phase.RUNNING, HALF, stream=UNDELIVERED, idle=600), Action.WAIT_FOR_WORKERS, None, None),
        (snap(Phase.RUNNING, HALF, stream=UNDELIVERED, idle=5), Action.PROGRESS, None, None),
        (
            snap(Phase.RUNNING, HALF, idle=10_000),
            Action.PROGRESS,
            None,
            None,
        ),  # stream not observed: no verdict
        (
            snap(Phase.RUNNING, HALF, stream=UNDELIVERED, idle=10_000, deadline=50),
            Action.FAIL_PENDING,
            Phase.FAILED,
            "DeadlineExceeded",
        ),
    ],
)
def test_decide(
    snapshot: Snapshot, action: Action, verdict_phase: Phase | None, fail_reason: str | None
) -> None:
    plan = decide(snapshot)
    assert plan.action is action
    assert (plan.verdict.phase if plan.verdict else None) == verdict_phase
    assert (plan.fail_reason.value if plan.fail_reason else None) == fail_reason


def test_stall_messages_carry_the_counters() -> None:
    lost = decide(snap(Phase.RUNNING, HALF, idle=700, stream=StreamView(True, True, 0, 3, 2)))
    assert "5 unfinished items are lost" in lost.message and "3 redelivered" in lost.message
    waiting = decide(snap(Phase.RUNNING, HALF, idle=700, stream=UNDELIVERED))
    assert "4 of 10 tasks were never delivered" in waiting.message


@pytest.mark.parametrize(
    ("snapshot", "changed", "expected"),
    [
        (snap(Phase.RUNNING, HALF), False, True),
        (snap(Phase.RUNNING, HALF), True, False),
        (snap(Phase.RUNNING, ItemCounts(10, 0, 0)), False, False),
        (snap(Phase.RUNNING, None), False, False),
        (snap(Phase.DISPATCHING, HALF), False, False),
        (snap(Phase.SUCCEEDED, HALF), False, False),
    ],
)
def test_stream_is_observed_only_for_quiet_running_jobs(
    snapshot: Snapshot, changed: bool, expected: bool
) -> None:
    assert needs_stream_view(snapshot, changed) is expected


@pytest.mark.parametrize(
    ("total", "failed", "threshold", "phase", "reason"),
    [
        (1000, 0, 0.5, Phase.SUCCEEDED, "Completed"),
        (1000, 100, 0.5, Phase.SUCCEEDED, "CompletedWithFailures"),
        (1000, 500, 0.5, Phase.SUCCEEDED, "CompletedWithFailures"),
        (1000, 501, 0.5, Phase.FAILED, "FailureThresholdExceeded"),
        (20, 17, 0.9, Phase.SUCCEEDED, "CompletedWithFailures"),
        (20, 1, 0.0, Phase.FAILED, "FailureThresholdExceeded"),
    ],
)
def test_verdict(total: int, failed: int, threshold: float, phase: Phase, reason: str) -> None:
    result = verdict(total, failed, threshold)
    assert (result.phase, result.reason) == (phase, reason)
    assert str(failed) in result.message or failed == 0


@pytest.mark.parametrize(
    ("decided_on", "ledger", "stands"),
    [
        (ItemCounts(10, 0, 2), ItemCounts(10, 0, 2), True),
        (ItemCounts(10, 0, 2), ItemCounts(10, 1, 2), False),  # the ledger misses an outcome
        (ItemCounts(10, 0, 2), ItemCounts(10, 0, 6), False),  # other failures: another verdict
        (ItemCounts(10, 0, 2), ItemCounts(12, 0, 2), False),  # other items (source changed)
    ],
)
def test_a_verdict_stands_only_on_the_ledgers_counts(
    decided_on: ItemCounts, ledger: ItemCounts, stands: bool
) -> None:
    assert ledger_agrees(decided_on, ledger) is stands


def test_counts_and_completeness() -> None:
    counts = ItemCounts(total=20, pending=3, failed=2)
    assert (counts.processed, counts.succeeded) == (17, 15)
    assert completeness(None) is Completeness.STATE_MISSING
    assert completeness(counts) is Completeness.INCOMPLETE
    assert completeness(ItemCounts(20, 0, 0)) is Completeness.COMPLETE


def test_progress_and_delta() -> None:
    assert progress_percent(999, 1000) == "99%"
    assert progress_percent(1000, 1000) == "100%"
    assert progress_percent(0, 0) == "0%"
    current = {"processed": 5, "failed": 1, "progress": "50%"}
    assert status_delta(current, {"processed": 5, "failed": 1}) == {}
    assert status_delta(current, {"processed": 6, "failed": 1}) == {"processed": 6}


def test_conditions_keep_transition_time_when_status_is_unchanged() -> None:
    first = set_condition([], "Progressing", "True", "A", "m1", 1, "2026-01-01T00:00:00Z")
    second = set_condition(first, "Progressing", "True", "A", "m2", 1, "2026-01-02T00:00:00Z")
    assert second[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    third = set_condition(second, "Progressing", "False", "B", "m3", 1, "2026-01-03T00:00:00Z")
    assert third[0]["lastTransitionTime"] == "2026-01-03T00:00:00Z"
    assert same_conditions(first, set_condition(first, "Progressing", "True", "A", "m1", 1, "later"))
    assert not same_conditions(first, second)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (["a", ""], "spec.items[1]: empty item id"),
        (["a", {"url": "x"}], "spec.items[1]: an item object needs a string `id`"),
        (["a", None], "spec.items[1]: an item must be an id string"),
    ],
)
def test_bad_inline_items_name_the_item(raw: list[object], message: str) -> None:
    with pytest.raises(items.ItemSourceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        items.from_inline(raw)


def test_duplicates_and_empty_lists_are_refused() -> None:
    with pytest.raises(items.ItemSourceError, match="duplicate item id 'b' \\(items 1 and 2\\)"):
        items.check_unique(items.from_inline(["a", "b", "b"]))
    with pytest.raises(items.ItemSourceError, match="no items"):
        items.check_unique([])


def test_configmap_lines_and_json_lines() -> None:
    data = {"b.jsonl": '{"id": "x3", "url": "u"}\n', "a": "x1\n\n# comment\nx2\n"}
    parsed = items.from_configmaps([("cm", data)])
    assert [i["id"] for i in parsed] == ["x1", "x2", "x3"]
    assert parsed[2]["url"] == "u"
    with pytest.raises(items.ItemSourceError, match="ConfigMap cm key k line 2: invalid JSON"):
        items.from_configmaps([("cm", {"k": "ok\n{broken\n"})])


def test_manifest_checksum() -> None:
    body = b"a\nb\n"
    good = hashlib.sha256(body).hexdigest()
    assert [i["id"] for i in items.from_manifest([body], "http://h/m", good)] == ["a", "b"]
    with pytest.raises(items.ItemSourceError, match="checksum mismatch"):
        items.from_manifest([body], "http://h/m", "0" * 64)


@pytest.mark.parametrize(
    ("phase", "present", "absent"),
    [
        (Phase.SUCCEEDED, {"Complete"}, {"Failed", "Cancelled"}),
        (Phase.FAILED, {"Failed"}, {"Complete", "Cancelled"}),
        (Phase.CANCELLED, {"Cancelled"}, {"Complete", "Failed"}),
    ],
)
def test_terminal_conditions_follow_the_job_api(phase: Phase, present: set[str], absent: set[str]) -> None:
    """`kubectl wait --for=condition=Complete` must never return for a failed or cancelled job."""
    from mljob.controller.terminal import terminal_conditions, terminal_fields

    true = {type_ for type_, status in terminal_conditions(phase) if status == "True"}
    assert true == present
    fields = terminal_fields({"conditions": []}, 3, phase, "R", "m", None)
    types = {c["type"] for c in fields["conditions"]}
    assert not types & absent
    assert all(c["observedGeneration"] == 3 for c in fields["conditions"])


def test_failed_item_summaries_name_ten_ids_and_count_the_rest() -> None:
    from mljob.controller.actions.fail_items import summarize_ids

    ids = [f"i{n}" for n in range(25)]
    assert summarize_ids(ids) == ", ".join(ids[:10]) + " and 15 more"
    assert summarize_ids(ids[:3]) == "i0, i1, i2"


@pytest.mark.parametrize(
    ("previous", "stream", "counts_changed", "expected"),
    [
        (None, SILENT, False, NOW),  # first silent look: from now
        (NOW - 50, SILENT, False, NOW - 50),  # still silent: since the first
        (NOW - 50, ALIVE, False, None),  # it answered
        (NOW - 50, NO_CONSUMER, False, None),  # missing is REDISPATCH's case, not silence
        (NOW - 50, None, False, NOW - 50),  # not looked at this tick
        (NOW - 50, None, True, None),  # the counts moved: a consumer delivers
        (NOW - 50, SILENT, True, None),
    ],
)
def test_a_consumer_is_silent_since_the_first_of_an_unbroken_run_of_silent_looks(
    previous: float | None, stream: StreamView | None, counts_changed: bool, expected: float | None
) -> None:
    assert silent_since(previous, stream, counts_changed, NOW) == expected
