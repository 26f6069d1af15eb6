"""Reconcile decisions and item rules, table-driven: pure functions, no services."""

from __future__ import annotations

import hashlib

import pytest

from mljob.api.models import Phase
from mljob.core import items
from mljob.core.conditions import same_conditions, set_condition
from mljob.core.counts import Completeness, ItemCounts, completeness
from mljob.core.reconcile import Action, Snapshot, decide, progress_percent, status_delta, verdict

pytestmark = pytest.mark.unit


def snap(
    phase: Phase | None = Phase.RUNNING,
    counts: ItemCounts | None = None,
    *,
    cancel: bool = False,
    dispatched: int = 10,
    total: int | None = 10,
    threshold: float = 0.5,
) -> Snapshot:
    return Snapshot(
        phase=phase,
        cancel=cancel,
        failure_threshold=threshold,
        dispatched=dispatched,
        total=total,
        counts=counts,
    )


@pytest.mark.parametrize(
    ("snapshot", "action", "verdict_phase"),
    [
        (snap(Phase.SUCCEEDED, ItemCounts(10, 0, 0)), Action.CLEANUP, None),
        (snap(Phase.CANCELLED), Action.CLEANUP, None),
        (snap(Phase.FAILED, None), Action.CLEANUP, None),
        (snap(Phase.RUNNING, ItemCounts(10, 5, 0), cancel=True), Action.FINISH, Phase.CANCELLED),
        (snap(None, None, dispatched=0, total=None), Action.DISPATCH, None),
        (snap(Phase.PENDING, None, dispatched=0, total=None), Action.DISPATCH, None),
        (snap(Phase.DISPATCHING, ItemCounts(10, 10, 0), dispatched=4), Action.DISPATCH, None),
        (snap(Phase.RUNNING, None), Action.STATE_MISSING, None),  # row 8: missing is never complete
        (snap(Phase.RUNNING, ItemCounts(10, 3, 1)), Action.PROGRESS, None),
        (snap(Phase.RUNNING, ItemCounts(10, 0, 0)), Action.FINISH, Phase.SUCCEEDED),
        (snap(Phase.RUNNING, ItemCounts(10, 0, 5)), Action.FINISH, Phase.SUCCEEDED),  # 50% is not above 50%
        (snap(Phase.RUNNING, ItemCounts(10, 0, 6)), Action.FINISH, Phase.FAILED),
        (snap(Phase.RUNNING, ItemCounts(10, 0, 1), threshold=0.0), Action.FINISH, Phase.FAILED),
    ],
)
def test_decide(snapshot: Snapshot, action: Action, verdict_phase: Phase | None) -> None:
    plan = decide(snapshot)
    assert plan.action is action
    assert (plan.verdict.phase if plan.verdict else None) == verdict_phase


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
    assert [i["id"] for i in items.from_manifest(body, "http://h/m", good)] == ["a", "b"]
    with pytest.raises(items.ItemSourceError, match="checksum mismatch"):
        items.from_manifest(body, "http://h/m", "0" * 64)
