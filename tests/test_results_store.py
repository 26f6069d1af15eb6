"""The Postgres results ledger against a REAL Postgres, one fresh schema per test."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from mljob import protocol
from mljob.adapters.results_store import RejectedResult, ResultsStore, make_pool
from mljob.devstack.stack import free_port

OK = protocol.Outcome.SUCCEEDED
FAILED = protocol.Outcome.FAILED


def result(uid: str, item: str, outcome: protocol.Outcome = OK, **extra: object) -> protocol.Result:
    return protocol.Result.model_validate({"job_uid": uid, "item_id": item, "outcome": outcome, **extra})


async def test_pool_uses_the_given_schema(store: ResultsStore, pg_schema: str) -> None:
    async with store.pool.connection() as conn:
        cur = await conn.execute("SELECT current_schema()")
        assert await cur.fetchone() == (pg_schema,)


async def test_upsert_stores_every_column(store: ResultsStore) -> None:
    uid = str(uuid.uuid4())
    finished = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    stored = await store.upsert(
        [
            result(
                uid, "a", OK, result={"boxes": [1, 2], "label": "cat"}, worker="w-1", finished_at=finished
            ),
            result(uid, "b", FAILED, error="CUDA OOM", attempts=2),
        ]
    )
    assert stored == {(uid, "a"): OK, (uid, "b"): FAILED}
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT item_id, outcome, result, error, attempts, worker, finished_at FROM mljob_results "
            "WHERE job_uid = %s ORDER BY item_id",
            (uid,),
        )
        rows = await cur.fetchall()
    assert rows[0] == ("a", "succeeded", {"boxes": [1, 2], "label": "cat"}, None, 1, "w-1", finished)
    assert rows[1][:6] == ("b", "failed", None, "CUDA OOM", 2, None)


async def test_redelivery_is_idempotent_and_first_outcome_stands(store: ResultsStore) -> None:
    uid = str(uuid.uuid4())
    await store.upsert([result(uid, "a", OK), result(uid, "b", FAILED, error="boom")])
    stored = await store.upsert([result(uid, "a", FAILED, error="late"), result(uid, "c", OK)])
    assert stored == {(uid, "a"): OK, (uid, "c"): OK}  # what is stored, not what was sent
    assert await store.count(uid) == (3, 1)
    assert await store.item_outcomes(uid) == {"a": "succeeded", "b": "failed", "c": "succeeded"}


async def test_duplicates_inside_one_batch(store: ResultsStore) -> None:
    uid = str(uuid.uuid4())
    stored = await store.upsert([result(uid, "a", FAILED), result(uid, "a", OK), result(uid, "b", OK)])
    assert stored == {(uid, "a"): FAILED, (uid, "b"): OK}
    assert await store.count(uid) == (2, 1)


async def test_jobs_do_not_mix(store: ResultsStore) -> None:
    one, two = str(uuid.uuid4()), str(uuid.uuid4())
    await store.upsert([result(one, "a", FAILED), result(two, "a", OK), result(two, "b", OK)])
    assert await store.count(one) == (1, 1)
    assert await store.count(two) == (2, 0)
    assert await store.count(str(uuid.uuid4())) == (0, 0)
    assert await store.item_outcomes(str(uuid.uuid4())) == {}


async def test_large_batch_and_empty_batch(store: ResultsStore) -> None:
    uid = str(uuid.uuid4())
    assert await store.upsert([]) == {}
    batch = [result(uid, f"i{n}", FAILED if n % 4 == 0 else OK, result={"n": n}) for n in range(5000)]
    stored = await store.upsert(batch)
    assert len(stored) == 5000
    assert await store.count(uid) == (5000, 1250)


@pytest.mark.parametrize(
    "bad",
    [
        {"item_id": "nul\x00byte"},
        {"error": "nul\x00byte"},
        {"result": {"text": "nul\x00in json"}},
    ],
    ids=["nul-in-item-id", "nul-in-error", "nul-in-json"],
)
async def test_refused_data_is_rejected_not_an_outage(store: ResultsStore, bad: dict[str, object]) -> None:
    uid = str(uuid.uuid4())
    fields: dict[str, object] = {"job_uid": uid, "item_id": "x", "outcome": "failed", **bad}
    with pytest.raises(RejectedResult):
        await store.upsert([result(uid, "fine"), protocol.Result.model_validate(fields)])
    assert await store.count(uid) == (0, 0)  # the statement is atomic


async def test_dead_letter_keeps_the_raw_payload(store: ResultsStore) -> None:
    marker = uuid.uuid4().hex
    await store.dead_letter("collector", f"mljob.results.{marker}", b"\xff\x00not json", "bad\x00reason")
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT source, payload, reason FROM mljob_dead_letters WHERE subject = %s",
            (f"mljob.results.{marker}",),
        )
        rows = await cur.fetchall()
    assert rows == [("collector", b"\xff\x00not json", "bad\\x00reason")]


async def test_unreachable_postgres_fails_fast_and_is_not_a_rejection() -> None:
    pool = make_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/mljob", timeout=1.0, connect_timeout=1)
    await pool.open(wait=False)
    try:
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            await ResultsStore(pool).upsert([result("u", "a")])
        assert not isinstance(caught.value, RejectedResult)
        assert time.monotonic() - started < 10
    finally:
        await pool.close()
