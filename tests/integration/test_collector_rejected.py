"""Scenario E, result recording keeps failing: a result Postgres refuses (NUL in its JSON) for a
registered item is recorded as that item's failure (`ResultRejected: <reason>`, no payload), so
the job can end with a clear per-item reason instead of waiting for its stall timeout. Against
REAL NATS, Redis and Postgres, with the collector tests' fixtures.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import psycopg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from mljob import protocol
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore, UpsertResult
from mljob.collector.results import REJECTED_REASON
from support.collecting import (
    FAILED,
    OK,
    ResultsStream,
    body,
    collector_for,
    dead_letters,
    dispatched,
    drained_listener,
    running,
    settled,
)
from support.waiting import eventually

NUL_RESULT = {"caption": "before\u0000after"}


async def rows(store: ResultsStore, uid: str) -> dict[str, tuple[str, str | None, object]]:
    """item -> (outcome, error, result) of the job."""
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT item_id, outcome, error, result FROM mljob_results WHERE job_uid = %s", (uid,)
        )
        return {r[0]: (r[1], r[2], r[3]) for r in await cur.fetchall()}


async def test_a_result_postgres_refuses_fails_its_item_with_result_rejected(
    js: JetStreamContext, nc: NATS, state: JobState, store: ResultsStore, results: ResultsStream
) -> None:
    uid = str(uuid.uuid4())
    await dispatched(state, store, uid, ["a", "b", "c"])
    drained = await drained_listener(nc, uid)
    poison = body(uid, "b", OK, result=NUL_RESULT)
    await js.publish(results.subject(uid), body(uid, "a", OK, result={"n": 1}))
    await js.publish(results.subject(uid), poison)
    await js.publish(results.subject(uid), body(uid, "c", FAILED))
    async with running(collector_for(js, nc, state, store, results)):
        await eventually(lambda: settled(js, results), 60, what="every message acked")
        await eventually(lambda: asyncio.sleep(0, result=bool(drained)), 10, what="drained")
    stored = await rows(store, uid)
    assert stored["a"] == ("succeeded", None, {"n": 1})
    outcome, error, payload = stored["b"]
    assert (outcome, payload) == ("failed", None)
    assert error is not None and error.startswith(f"{REJECTED_REASON}: rejected by Postgres"), error
    assert stored["c"][0] == "failed"
    letters = await dead_letters(store)
    assert [(letter[1], letter[2]) for letter in letters] == [(results.subject(uid), poison)]
    counts = await state.counts(uid)
    assert counts is not None and (counts.pending, counts.failed) == (0, 2)


async def test_the_first_outcome_stands_over_a_later_rejected_result(
    js: JetStreamContext, nc: NATS, state: JobState, store: ResultsStore, results: ResultsStream
) -> None:
    """A redelivered duplicate whose data Postgres refuses cannot turn a success into a failure."""
    uid = str(uuid.uuid4())
    await dispatched(state, store, uid, ["a", "b"])
    await js.publish(results.subject(uid), body(uid, "a", OK))
    async with running(collector_for(js, nc, state, store, results)):
        await eventually(lambda: settled(js, results), 60, what="the first result acked")
        await js.publish(results.subject(uid), body(uid, "a", OK, result=NUL_RESULT))
        await js.publish(results.subject(uid), body(uid, "b", OK))
        await eventually(lambda: settled(js, results), 60, what="every message acked")
    assert {item: row[0] for item, row in (await rows(store, uid)).items()} == {
        "a": "succeeded",
        "b": "succeeded",
    }
    counts = await state.counts(uid)
    assert counts is not None and (counts.pending, counts.failed) == (0, 0)


class OutageOnFirstSubstitute(ResultsStore):
    """Postgres goes away exactly when the collector stores its first ResultRejected failure."""

    def __init__(self, store: ResultsStore) -> None:
        super().__init__(store.pool)
        self.outages = 0

    async def upsert(self, batch: Sequence[protocol.Result]) -> UpsertResult:
        rejected = any((r.error or "").startswith(REJECTED_REASON) for r in batch)
        if rejected and self.outages == 0:
            self.outages += 1
            raise psycopg.OperationalError("connection lost (injected)")
        return await super().upsert(batch)


async def test_an_outage_while_failing_the_item_is_retried_not_taken_for_a_refusal(
    js: JetStreamContext, nc: NATS, state: JobState, store: ResultsStore, results: ResultsStream
) -> None:
    """Nothing of the batch is acked until the failure is durable; the redelivery stores it once."""
    uid = str(uuid.uuid4())
    await dispatched(state, store, uid, ["a", "b"])
    flaky = OutageOnFirstSubstitute(store)
    poison = body(uid, "b", OK, result=NUL_RESULT)
    await js.publish(results.subject(uid), body(uid, "a", OK))
    await js.publish(results.subject(uid), poison)
    async with running(collector_for(js, nc, state, flaky, results)):
        await eventually(lambda: settled(js, results), 60, what="every message acked")
    assert flaky.outages == 1
    stored = await rows(store, uid)
    assert (stored["a"][0], stored["b"][0]) == ("succeeded", "failed")
    assert (stored["b"][1] or "").startswith(REJECTED_REASON)
    assert [letter[2] for letter in await dead_letters(store)] == [poison]
    counts = await state.counts(uid)
    assert counts is not None and (counts.pending, counts.failed) == (0, 1)
