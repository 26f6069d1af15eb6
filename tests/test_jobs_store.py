"""The job row in the real Postgres: what it records with a phase change.

Issue 13: a job that finished within one tick kept `dispatched = 0` in `mljob_jobs` while its
MLJob status said every task was dispatched; the Running transition now records it.
"""

from __future__ import annotations

import uuid

from mljob.adapters.jobs_store import JobsStore
from mljob.adapters.results_store import ResultsStore
from mljob.api.models import Phase


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
