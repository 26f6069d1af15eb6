"""One contract per store, run against every implementation of it: the in-memory fakes the unit
tests of the loop decide on (tests/support/fakes/stores.py) and the real adapters (JobState on
the stack's Redis under a key prefix of the test's own, ResultsStore and JobsStore on its
Postgres in a freshly migrated schema of the test's own).

The cases are what the controller's decisions rely on: the item state's counts (missing state
is never "complete", an outcome moves one item once), the ledger's registration and first
outcome, the failing of pending items, and the jobs row's guarded phase moves (a terminal phase
is absorbing; the phase table of mljob.core.phases is enforced). When a fake disagrees with
its store, the fake is what is wrong.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mljob import ledger, protocol
from mljob.adapters.jobs_store import JobsStore
from mljob.adapters.redis_state import JobState, RecordStatus
from mljob.adapters.results_store import RejectedResult, ResultsStore, UpsertResult
from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.core.counts import Completeness, ItemCounts, completeness
from mljob.core.phases import can_transition, moves_to
from support.fakes.stores import FakeJobsStore, FakeJobState, FakeResultsStore

OK = protocol.Outcome.SUCCEEDED
FAILED = protocol.Outcome.FAILED
NEW, DUPLICATE, NO_STATE = RecordStatus.NEW, RecordStatus.DUPLICATE, RecordStatus.NO_STATE
NON_TERMINAL = [p for p in Phase if p not in TERMINAL_PHASES]
COUNTS = ItemCounts(total=5, pending=3, failed=1)

ItemState = JobState | FakeJobState
Ledger = ResultsStore | FakeResultsStore
Transitions = list[tuple[str | None, str, str]]


def new_uid() -> str:
    return str(uuid.uuid4())


def result(uid: str, item: str, outcome: protocol.Outcome = OK, **extra: object) -> protocol.Result:
    return protocol.Result.model_validate({"job_uid": uid, "item_id": item, "outcome": outcome, **extra})


# --- the implementations ------------------------------------------------------------------------


@pytest.fixture(params=["fake", "redis"])
def item_state(request: pytest.FixtureRequest) -> ItemState:
    """The per-job item state: FakeJobState, or JobState on the real Redis."""
    if request.param == "fake":
        return FakeJobState()
    real: JobState = request.getfixturevalue("state")
    return real


@pytest.fixture(params=["fake", "postgres"])
def results_ledger(request: pytest.FixtureRequest) -> Ledger:
    """The results ledger: FakeResultsStore, or ResultsStore on the real Postgres."""
    if request.param == "fake":
        return FakeResultsStore()
    real: ResultsStore = request.getfixturevalue("store")
    return real


@pytest.fixture(params=["fakes", "real"])
def ledger_and_state(request: pytest.FixtureRequest) -> tuple[Ledger, ItemState]:
    """The ledger and the item state as `mljob.ledger` writes them together: both fakes, or both real."""
    if request.param == "fakes":
        return FakeResultsStore(), FakeJobState()
    return request.getfixturevalue("store"), request.getfixturevalue("state")


@dataclass
class JobRows:
    """A jobs store, and how to read the audit rows (`mljob_transitions`) of one job."""

    store: JobsStore | FakeJobsStore
    transitions: Callable[[str], Awaitable[Transitions]]


@pytest.fixture(params=["fake", "postgres"])
def job_rows(request: pytest.FixtureRequest) -> JobRows:
    """The jobs table: FakeJobsStore, or JobsStore on the real Postgres."""
    if request.param == "fake":
        fake = FakeJobsStore()

        async def fake_transitions(uid: str) -> Transitions:
            return [(t.from_phase, t.to_phase, t.actor) for t in fake.audit if t.uid == uid]

        return JobRows(fake, fake_transitions)
    real: JobsStore = request.getfixturevalue("jobs")

    async def real_transitions(uid: str) -> Transitions:
        async with real.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT from_phase, to_phase, actor FROM mljob_transitions WHERE job_uid = %s ORDER BY id",
                (uid,),
            )
            return [(f, t, a) for f, t, a in await cur.fetchall()]

    return JobRows(real, real_transitions)


# --- the item state (Redis) -------------------------------------------------------------------


async def test_initialize_then_counts_every_distinct_item_pending(item_state: ItemState) -> None:
    uid = new_uid()
    assert await item_state.initialize(uid, ["a", "b", "c", "b"]) is True
    assert await item_state.counts(uid) == ItemCounts(total=3, pending=3, failed=0, last_activity=None)
    assert await item_state.pending_ids(uid) == {"a", "b", "c"}
    assert await item_state.failed_ids(uid) == set()


async def test_a_second_initialize_loses_and_keeps_the_progress(item_state: ItemState) -> None:
    uid = new_uid()
    assert await item_state.initialize(uid, ["a", "b", "c"]) is True
    await item_state.record([(uid, "a", False), (uid, "b", True)], now=100.0)
    assert await item_state.initialize(uid, ["a", "b", "c", "d"]) is False
    assert await item_state.counts(uid) == ItemCounts(total=3, pending=1, failed=1, last_activity=100.0)
    assert await item_state.pending_ids(uid) == {"c"}


async def test_missing_state_is_none_never_complete_and_an_empty_job_is_complete(
    item_state: ItemState,
) -> None:
    unknown, empty = new_uid(), new_uid()
    assert await item_state.counts(unknown) is None
    assert completeness(await item_state.counts(unknown)) is Completeness.STATE_MISSING
    assert await item_state.initialize(empty, []) is True
    assert await item_state.counts(empty) == ItemCounts(total=0, pending=0, failed=0)
    assert completeness(await item_state.counts(empty)) is Completeness.COMPLETE


async def test_an_outcome_moves_exactly_one_item_out_of_pending(item_state: ItemState) -> None:
    uid = new_uid()
    await item_state.initialize(uid, ["a", "b", "c"])
    [ok] = await item_state.record([(uid, "a", False)], now=10.0)
    assert (ok.uid, ok.item_id, ok.status, ok.pending_left) == (uid, "a", NEW, 2)
    [failed] = await item_state.record([(uid, "b", True)], now=11.0)
    assert (failed.status, failed.pending_left) == (NEW, 1)
    assert await item_state.counts(uid) == ItemCounts(total=3, pending=1, failed=1, last_activity=11.0)
    assert await item_state.pending_ids(uid) == {"c"}
    assert await item_state.failed_ids(uid) == {"b"}


async def test_a_repeated_or_second_outcome_of_an_item_does_not_count_again(item_state: ItemState) -> None:
    uid = new_uid()
    await item_state.initialize(uid, ["a", "b"])
    await item_state.record([(uid, "a", False)], now=10.0)
    again = await item_state.record([(uid, "a", False), (uid, "a", True)], now=20.0)
    assert [(o.status, o.pending_left) for o in again] == [(DUPLICATE, 1), (DUPLICATE, 1)]
    # a duplicate is no activity: the last recorded result is still the first one
    assert await item_state.counts(uid) == ItemCounts(total=2, pending=1, failed=0, last_activity=10.0)
    assert await item_state.failed_ids(uid) == set()


async def test_the_same_item_twice_in_one_batch_counts_once(item_state: ItemState) -> None:
    uid = new_uid()
    await item_state.initialize(uid, ["a", "b"])
    outcomes = await item_state.record([(uid, "a", True), (uid, "a", False), (uid, "b", False)], now=5.0)
    assert [(o.item_id, o.status, o.pending_left) for o in outcomes] == [
        ("a", NEW, 1),
        ("a", DUPLICATE, 1),
        ("b", NEW, 0),
    ]
    assert await item_state.counts(uid) == ItemCounts(total=2, pending=0, failed=1, last_activity=5.0)


async def test_an_id_that_is_not_an_item_is_a_duplicate_and_changes_nothing(item_state: ItemState) -> None:
    uid = new_uid()
    await item_state.initialize(uid, ["a"])
    [outcome] = await item_state.record([(uid, "stranger", True)], now=5.0)
    assert (outcome.status, outcome.pending_left) == (DUPLICATE, 1)
    assert await item_state.counts(uid) == ItemCounts(total=1, pending=1, failed=0)


async def test_an_outcome_for_a_job_without_state_creates_none(item_state: ItemState) -> None:
    uid, other = new_uid(), new_uid()
    await item_state.initialize(other, ["a"])
    outcomes = await item_state.record([(uid, "a", False), (other, "a", False)], now=5.0)
    assert [(o.uid, o.status, o.pending_left) for o in outcomes] == [(uid, NO_STATE, None), (other, NEW, 0)]
    assert await item_state.counts(uid) is None
    assert set(await item_state.scan_jobs()) == {other}


async def test_activity_only_moves_forward(item_state: ItemState) -> None:
    uid = new_uid()
    await item_state.initialize(uid, ["a", "b"])
    await item_state.record([(uid, "a", False)], now=50.0)
    await item_state.record([(uid, "b", False)], now=40.0)  # a result that finished earlier, late
    counts = await item_state.counts(uid)
    assert counts is not None and (counts.pending, counts.last_activity) == (0, 50.0)


async def test_mark_failed_fails_only_pending_items_and_says_how_many(item_state: ItemState) -> None:
    uid = new_uid()
    await item_state.initialize(uid, ["a", "b", "c", "d"])
    await item_state.record([(uid, "a", False), (uid, "b", True)], now=1.0)
    assert await item_state.mark_failed(uid, ["a", "b", "c", "d", "stranger"], now=2.0) == 2
    assert await item_state.mark_failed(uid, ["c", "d"], now=3.0) == 0
    assert await item_state.counts(uid) == ItemCounts(total=4, pending=0, failed=3, last_activity=2.0)
    assert await item_state.failed_ids(uid) == {"b", "c", "d"}
    assert await item_state.mark_failed(new_uid(), ["a"], now=4.0) == 0  # no state: nothing


async def test_delete_removes_the_state_idempotently(item_state: ItemState) -> None:
    uid, kept = new_uid(), new_uid()
    await item_state.initialize(uid, ["a", "b"])
    await item_state.initialize(kept, ["a"])
    await item_state.record([(uid, "a", True)], now=1.0)
    await item_state.delete(uid)
    await item_state.delete(uid)
    await item_state.delete(new_uid())
    assert await item_state.counts(uid) is None
    assert await item_state.pending_ids(uid) == set() and await item_state.failed_ids(uid) == set()
    [late] = await item_state.record([(uid, "b", False)], now=2.0)  # a late result after cleanup
    assert late.status is NO_STATE and await item_state.counts(uid) is None
    assert set(await item_state.scan_jobs()) == {kept}
    assert await item_state.counts(kept) == ItemCounts(total=1, pending=1, failed=0)


async def test_restore_rebuilds_lost_state_once(item_state: ItemState) -> None:
    uid = new_uid()
    assert await item_state.restore(uid, 4, ["c", "d"], ["b"], now=30.0) is True
    assert await item_state.counts(uid) == ItemCounts(total=4, pending=2, failed=1, last_activity=30.0)
    assert await item_state.restore(uid, 9, ["x"], [], now=31.0) is False
    assert await item_state.initialize(uid, ["x"]) is False
    assert await item_state.pending_ids(uid) == {"c", "d"}
    assert await item_state.failed_ids(uid) == {"b"}
    [outcome] = await item_state.record([(uid, "b", False)], now=32.0)  # b is done: failed stands
    assert outcome.status is DUPLICATE


# --- the results ledger (Postgres) --------------------------------------------------------------


async def test_registered_count_counts_distinct_items_across_registrations(results_ledger: Ledger) -> None:
    uid = new_uid()
    assert await results_ledger.registered_count(uid) == 0
    await results_ledger.register_items(uid, ["a", "b", "c"])
    await results_ledger.register_items(uid, ["b", "c", "d", "d"])  # a resumed dispatch, plus one
    await results_ledger.register_items(uid, [])
    assert await results_ledger.registered_count(uid) == 4
    assert await results_ledger.unresolved_items(uid) == ["a", "b", "c", "d"]
    assert await results_ledger.registered_count(new_uid()) == 0


async def test_only_registered_items_are_recorded_and_the_refused_are_told_apart(
    results_ledger: Ledger,
) -> None:
    uid, stranger = new_uid(), new_uid()
    await results_ledger.register_items(uid, ["a", "b"])
    out = await results_ledger.upsert(
        [result(uid, "a"), result(uid, "forged", FAILED), result(stranger, "a", FAILED), result(uid, "b ")]
    )
    assert out == UpsertResult(
        stored={(uid, "a"): OK}, unknown_job={(stranger, "a")}, not_an_item={(uid, "forged"), (uid, "b ")}
    )
    assert await results_ledger.count(uid) == (1, 0)
    assert await results_ledger.count(stranger) == (0, 0)
    assert await results_ledger.upsert([]) == UpsertResult()


async def test_the_first_outcome_stands_and_the_caller_is_told_which(results_ledger: Ledger) -> None:
    uid = new_uid()
    await results_ledger.register_items(uid, ["a", "b", "c"])
    first = await results_ledger.upsert([result(uid, "a", OK), result(uid, "b", FAILED, error="boom")])
    assert first.stored == {(uid, "a"): OK, (uid, "b"): FAILED}
    again = await results_ledger.upsert([result(uid, "a", FAILED, error="late"), result(uid, "b", OK)])
    assert again.stored == {(uid, "a"): OK, (uid, "b"): FAILED}  # what stands, not what was sent
    assert await results_ledger.count(uid) == (2, 1)
    assert await results_ledger.item_outcomes(uid) == {"a": "succeeded", "b": "failed"}
    assert await results_ledger.unresolved_items(uid) == ["c"]


async def test_duplicates_inside_one_batch_keep_the_first(results_ledger: Ledger) -> None:
    uid = new_uid()
    await results_ledger.register_items(uid, ["a", "b"])
    out = await results_ledger.upsert([result(uid, "a", FAILED), result(uid, "a", OK), result(uid, "b", OK)])
    assert out.stored == {(uid, "a"): FAILED, (uid, "b"): OK}
    assert await results_ledger.count(uid) == (2, 1)


async def test_unresolved_items_are_sorted_and_keep_their_fields_as_first_registered(
    results_ledger: Ledger,
) -> None:
    """What re-dispatch builds its tasks from; NaN is null there, as the task body carries it."""
    uid = new_uid()
    await results_ledger.register_items(
        uid, [{"id": "d", "page": 1, "tags": ["x"]}, {"id": "b", "score": math.nan}, "c", {"id": "a"}]
    )
    await results_ledger.register_items(uid, [{"id": "d", "page": 99}, {"id": "e", "page": 5}])
    await results_ledger.upsert([result(uid, "a")])
    assert await results_ledger.unresolved_items(uid) == ["b", "c", "d", "e"]
    assert await results_ledger.unresolved_item_records(uid) == [
        {"id": "b", "score": None},
        {"id": "c"},
        {"id": "d", "page": 1, "tags": ["x"]},
        {"id": "e", "page": 5},
    ]


async def test_an_unstorable_item_id_is_refused_and_nothing_is_registered(results_ledger: Ledger) -> None:
    uid = new_uid()
    with pytest.raises(ValueError, match="not storable"):
        await results_ledger.register_items(uid, ["fine", "nul\x00id"])
    assert await results_ledger.registered_count(uid) == 0


@pytest.mark.parametrize(
    "bad",
    [{"error": "nul\x00byte"}, {"result": {"text": "nul\x00in json"}}, {"result": {"x": math.inf}}],
    ids=["nul-in-error", "nul-in-json", "infinity-in-json"],
)
async def test_a_result_the_ledger_cannot_store_is_rejected_with_its_whole_batch(
    results_ledger: Ledger, bad: dict[str, Any]
) -> None:
    """The collector turns RejectedResult into the item's failure; an outage is something else."""
    uid = new_uid()
    await results_ledger.register_items(uid, ["fine", "x"])
    with pytest.raises(RejectedResult):
        await results_ledger.upsert([result(uid, "fine"), result(uid, "x", FAILED, **bad)])
    assert await results_ledger.count(uid) == (0, 0)
    assert await results_ledger.unresolved_items(uid) == ["fine", "x"]


async def test_recording_through_the_ledger_tells_redis_the_outcome_that_stands(
    ledger_and_state: tuple[Ledger, ItemState],
) -> None:
    store, state = ledger_and_state
    uid = new_uid()
    await store.register_items(uid, ["a", "b", "c"])
    await state.initialize(uid, ["a", "b", "c"])
    first = await ledger.record(store, state, [result(uid, "a", OK), result(uid, "forged", FAILED)])
    assert [(o.item_id, o.status) for o in first] == [("a", NEW)]  # the refused one is left out
    late = await ledger.record(store, state, [result(uid, "a", FAILED, error="late")])
    assert [(o.item_id, o.status) for o in late] == [("a", DUPLICATE)]
    assert await state.failed_ids(uid) == set()  # a is processed, never both processed and failed
    counts = await state.counts(uid)
    assert counts is not None and (counts.total, counts.pending, counts.failed) == (3, 2, 0)


async def test_failing_pending_items_fails_only_those_without_an_outcome(
    ledger_and_state: tuple[Ledger, ItemState],
) -> None:
    """What FAIL_PENDING does (deadline, stall, stream lost): fail what the ledger holds no
    outcome for; an item whose result landed first keeps it."""
    store, state = ledger_and_state
    uid = new_uid()
    items = ["a", "b", "c", "d"]
    await store.register_items(uid, items)
    await state.initialize(uid, items)
    await ledger.record(store, state, [result(uid, "a", OK), result(uid, "b", FAILED)])
    pending = await store.unresolved_items(uid)
    assert pending == ["c", "d"]
    newly = await ledger.fail_items(store, state, uid, ["a", *pending], "Lost", "test")
    assert newly == 2
    assert await store.item_outcomes(uid) == {"a": "succeeded", "b": "failed", "c": "failed", "d": "failed"}
    assert await store.count(uid) == (4, 3)
    counts = await state.counts(uid)
    assert counts is not None and (counts.total, counts.pending, counts.failed) == (4, 0, 3)
    assert await ledger.fail_items(store, state, uid, pending, "Lost", "again") == 0
    assert await store.count(uid) == (4, 3)


# --- the jobs table (Postgres) ------------------------------------------------------------------


async def row_at(job_rows: JobRows, phase: Phase) -> str:
    """A fresh job row brought to `phase` through the store's own writes."""
    jobs, uid = job_rows.store, new_uid()
    await jobs.ensure(uid, "ns", "job", "pipe", {})
    if phase in (Phase.DISPATCHING, Phase.RUNNING, Phase.CANCELING):
        await jobs.set_phase(uid, phase, "setup")
    elif phase in TERMINAL_PHASES:
        assert (await jobs.finish(uid, phase, "Setup", "set up", None, "setup")).won
    row = await jobs.get(uid)
    assert row is not None and row.phase is phase
    return uid


async def test_ensure_makes_one_pending_row_and_a_resumed_job_keeps_it(job_rows: JobRows) -> None:
    jobs, uid = job_rows.store, new_uid()
    assert await jobs.get(uid) is None
    await jobs.ensure(uid, "ns", "job", "pipe", {"pipeline": "pipe"})
    row = await jobs.get(uid)
    assert row is not None
    assert (row.uid, row.phase, row.total, row.processed, row.failed) == (uid, Phase.PENDING, 0, 0, 0)
    assert row.completion_time is None and row.counts is None
    await jobs.set_phase(uid, Phase.RUNNING, "test", dispatched=3)
    await jobs.ensure(uid, "other-ns", "other", "other-pipe", {})
    row = await jobs.get(uid)
    assert row is not None and row.phase is Phase.RUNNING
    assert await jobs.namespaces([uid, new_uid()]) == {uid: "ns"}


async def test_finish_twice_the_second_loses_and_reads_the_winner(job_rows: JobRows) -> None:
    jobs = job_rows.store
    uid = await row_at(job_rows, Phase.RUNNING)
    won = await jobs.finish(uid, Phase.SUCCEEDED, "Completed", "all done", COUNTS, "loop")
    assert won.won
    assert (won.row.phase, won.row.reason, won.row.message) == (Phase.SUCCEEDED, "Completed", "all done")
    assert (won.row.total, won.row.processed, won.row.failed) == (5, 2, 1)
    assert won.row.completion_time is not None
    lost = await jobs.finish(uid, Phase.CANCELLED, "Cancelled", "too late", None, "cancel")
    assert not lost.won
    assert lost.row == won.row  # the loser mirrors what Postgres holds: the winner's row
    again = await jobs.finish(uid, Phase.SUCCEEDED, "Completed", "again", ItemCounts(9, 0, 0), "loop")
    assert not again.won and again.row == won.row
    assert await job_rows.transitions(uid) == [
        ("Pending", "Running", "setup"),
        ("Running", "Succeeded", "loop"),
    ]


async def test_finish_of_a_job_without_a_row_is_an_error(job_rows: JobRows) -> None:
    with pytest.raises(LookupError):
        await job_rows.store.finish(new_uid(), Phase.FAILED, "X", "no row", None, "loop")


@pytest.mark.parametrize("current", list(Phase), ids=[p.value for p in Phase])
async def test_finish_fires_exactly_where_the_phase_table_allows(job_rows: JobRows, current: Phase) -> None:
    for target in TERMINAL_PHASES:
        uid = await row_at(job_rows, current)
        before = await job_rows.transitions(uid)
        out = await job_rows.store.finish(uid, target, "Why", "because", None, "test")
        allowed = current != target and can_transition(current, target)
        assert out.won is allowed, (current, target)
        assert out.row.phase is (target if allowed else current), (current, target)
        row = await job_rows.store.get(uid)
        assert row == out.row
        added = [(current.value, target.value, "test")] if allowed else []
        assert await job_rows.transitions(uid) == before + added, (current, target)


@pytest.mark.parametrize("writer", ["set_phase", "progress"])
@pytest.mark.parametrize("current", list(Phase), ids=[p.value for p in Phase])
async def test_every_other_phase_change_is_one_the_table_allows_with_its_audit_row(
    job_rows: JobRows, current: Phase, writer: str
) -> None:
    jobs = job_rows.store
    for target in NON_TERMINAL:
        uid = await row_at(job_rows, current)
        before_row = await jobs.get(uid)
        before = await job_rows.transitions(uid)
        if writer == "set_phase":
            await jobs.set_phase(uid, target, "test")
        else:
            await jobs.progress(uid, target, COUNTS, 4, "test")
        row = await jobs.get(uid)
        assert row is not None and before_row is not None
        moved = moves_to(current, target)
        assert moved == (current != target and can_transition(current, target))
        assert row.phase is (target if moved else current), (current, target)
        added = [(current.value, target.value, "test")] if moved else []
        assert await job_rows.transitions(uid) == before + added, (current, target)
        if writer == "progress" and current not in TERMINAL_PHASES:
            assert (row.total, row.processed, row.failed) == (5, 2, 1), (current, target)
        else:
            assert (row.total, row.processed, row.failed) == (
                before_row.total,
                before_row.processed,
                before_row.failed,
            ), (current, target)


@pytest.mark.parametrize("target", sorted(TERMINAL_PHASES), ids=str)
async def test_set_phase_never_writes_a_terminal_phase(job_rows: JobRows, target: Phase) -> None:
    uid = await row_at(job_rows, Phase.RUNNING)
    with pytest.raises(ValueError, match="terminal"):
        await job_rows.store.set_phase(uid, target, "test")
    row = await job_rows.store.get(uid)
    assert row is not None and row.phase is Phase.RUNNING


async def test_a_terminal_row_is_absorbing_for_every_writer(job_rows: JobRows) -> None:
    jobs = job_rows.store
    uid = await row_at(job_rows, Phase.RUNNING)
    done = await jobs.finish(uid, Phase.FAILED, "Deadline", "too slow", COUNTS, "loop")
    await jobs.progress(uid, Phase.RUNNING, ItemCounts(5, 0, 0), 5, "late")
    await jobs.set_phase(uid, Phase.CANCELING, "late")
    await jobs.ensure(uid, "ns", "job", "pipe", {})
    assert (await jobs.finish(uid, Phase.CANCELLED, "Cancelled", "late", None, "late")).won is False
    assert await jobs.get(uid) == done.row
