"""The job row in the real Postgres: what it records with a phase change.

Issue 13: a job that finished within one tick kept `dispatched = 0` in `mljob_jobs` while its
MLJob status said every task was dispatched; the Running transition now records it.
Issue 14: every phase change is one the phase table allows, and has its transition row.
"""

from __future__ import annotations

import uuid

import pytest

from mljob.adapters.jobs_store import JobsStore
from mljob.adapters.results_store import ResultsStore
from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.core.counts import ItemCounts
from mljob.core.phases import can_transition


async def dispatched(store: ResultsStore, uid: str) -> int:
    async with store.pool.connection() as conn:
        cur = await conn.execute("SELECT dispatched FROM mljob_jobs WHERE uid = %s", (uid,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_running_records_what_was_dispatched_and_a_later_change_keeps_it(store: ResultsStore) -> None:
    jobs = JobsStore(store.pool)
    uid = str(uuid.uuid4())
    await jobs.ensure(uid, "ns", "job", "pipe", {})
    await jobs.set_phase(uid, Phase.DISPATCHING, "test")
    assert await dispatched(store, uid) == 0
    await jobs.set_phase(uid, Phase.RUNNING, "test", dispatched=7)
    assert await dispatched(store, uid) == 7
    await jobs.set_phase(uid, Phase.CANCELING, "test")  # says nothing about dispatch
    assert await dispatched(store, uid) == 7


NON_TERMINAL = [p for p in Phase if p not in TERMINAL_PHASES]
COUNTS = ItemCounts(total=5, pending=3, failed=1)


async def row_at(jobs: JobsStore, phase: Phase) -> str:
    """A fresh job row put straight into `phase` (no transition row: the test's own set-up)."""
    uid = str(uuid.uuid4())
    await jobs.ensure(uid, "ns", "job", "pipe", {})
    async with jobs.pool.connection() as conn:
        await conn.execute("UPDATE mljob_jobs SET phase = %s WHERE uid = %s", (phase.value, uid))
    return uid


async def transitions(jobs: JobsStore, uid: str) -> list[tuple[str | None, str, str]]:
    async with jobs.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT from_phase, to_phase, actor FROM mljob_transitions WHERE job_uid = %s ORDER BY id",
            (uid,),
        )
        return [(f, t, a) for f, t, a in await cur.fetchall()]


@pytest.mark.parametrize("writer", ["set_phase", "progress"])
async def test_every_phase_change_is_one_the_table_allows_with_its_transition_row(
    store: ResultsStore, writer: str
) -> None:
    """Issue 14: Postgres moved any non-terminal row (Canceling -> Running included), and
    `progress` moved it with no audit row. Each (current, target) pair against the table."""
    jobs = JobsStore(store.pool)
    for current in Phase:
        for target in NON_TERMINAL:
            uid = await row_at(jobs, current)
            if writer == "set_phase":
                await jobs.set_phase(uid, target, "test")
            else:
                await jobs.progress(uid, target, COUNTS, 4, "test")
            row = await jobs.get(uid)
            assert row is not None
            moved = current != target and can_transition(current, target)
            assert row.phase == (target if moved else current), (current, target)
            expected = [(current.value, target.value, "test")] if moved else []
            assert await transitions(jobs, uid) == expected, (current, target)


async def test_progress_of_a_canceling_row_keeps_its_phase_and_records_the_counts(
    store: ResultsStore,
) -> None:
    jobs = JobsStore(store.pool)
    uid = await row_at(jobs, Phase.CANCELING)
    await jobs.progress(uid, Phase.RUNNING, COUNTS, 4, "late-writer")  # an MLJob status that lags
    row = await jobs.get(uid)
    assert row is not None
    assert (row.phase, row.total, row.processed, row.failed) == (Phase.CANCELING, 5, 2, 1)
    assert await transitions(jobs, uid) == []
