"""The Postgres results ledger against a REAL Postgres, one fresh schema per test.

Results are stored only for registered items, so every test registers its job's items first.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from mljob import protocol
from mljob.adapters.results_store import RejectedResult, ResultsStore, UpsertResult, make_pool
from mljob_dev.devstack.stack import free_port

OK = protocol.Outcome.SUCCEEDED
FAILED = protocol.Outcome.FAILED


def result(uid: str, item: str, outcome: protocol.Outcome = OK, **extra: object) -> protocol.Result:
    return protocol.Result.model_validate({"job_uid": uid, "item_id": item, "outcome": outcome, **extra})


async def new_job(store: ResultsStore, items: list[str]) -> str:
    """A fresh job uid with `items` registered."""
    uid = str(uuid.uuid4())
    await store.register_items(uid, items)
    return uid


async def test_pool_uses_the_given_schema(store: ResultsStore, pg_schema: str) -> None:
    async with store.pool.connection() as conn:
        cur = await conn.execute("SELECT current_schema()")
        assert await cur.fetchone() == (pg_schema,)


async def test_upsert_stores_every_column(store: ResultsStore) -> None:
    uid = await new_job(store, ["a", "b"])
    finished = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    stored = await store.upsert(
        [
            result(
                uid, "a", OK, result={"boxes": [1, 2], "label": "cat"}, worker="w-1", finished_at=finished
            ),
            result(uid, "b", FAILED, error="CUDA OOM", attempts=2),
        ]
    )
    assert stored == UpsertResult(stored={(uid, "a"): OK, (uid, "b"): FAILED})
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
    uid = await new_job(store, ["a", "b", "c"])
    await store.upsert([result(uid, "a", OK), result(uid, "b", FAILED, error="boom")])
    stored = await store.upsert([result(uid, "a", FAILED, error="late"), result(uid, "c", OK)])
    assert stored.stored == {(uid, "a"): OK, (uid, "c"): OK}  # what is stored, not what was sent
    assert await store.count(uid) == (3, 1)
    assert await store.item_outcomes(uid) == {"a": "succeeded", "b": "failed", "c": "succeeded"}


async def test_duplicates_inside_one_batch(store: ResultsStore) -> None:
    uid = await new_job(store, ["a", "b"])
    stored = await store.upsert([result(uid, "a", FAILED), result(uid, "a", OK), result(uid, "b", OK)])
    assert stored.stored == {(uid, "a"): FAILED, (uid, "b"): OK}
    assert await store.count(uid) == (2, 1)


async def test_jobs_do_not_mix(store: ResultsStore) -> None:
    one, two = await new_job(store, ["a"]), await new_job(store, ["a", "b"])
    await store.upsert([result(one, "a", FAILED), result(two, "a", OK), result(two, "b", OK)])
    assert await store.count(one) == (1, 1)
    assert await store.count(two) == (2, 0)
    assert await store.count(str(uuid.uuid4())) == (0, 0)
    assert await store.item_outcomes(str(uuid.uuid4())) == {}


async def test_large_batch_and_empty_batch(store: ResultsStore) -> None:
    uid = await new_job(store, [f"i{n}" for n in range(5000)])
    assert await store.upsert([]) == UpsertResult()
    batch = [result(uid, f"i{n}", FAILED if n % 4 == 0 else OK, result={"n": n}) for n in range(5000)]
    stored = await store.upsert(batch)
    assert len(stored.stored) == 5000
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
    uid = await new_job(store, ["fine", "x"])
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


async def test_register_items_is_idempotent_and_counted(store: ResultsStore) -> None:
    uid = str(uuid.uuid4())
    assert await store.registered_count(uid) == 0
    await store.register_items(uid, ["a", "b", "c"])
    await store.register_items(uid, ["b", "c", "d", "d"])  # a resumed dispatch, plus one more
    await store.register_items(uid, [])
    assert await store.registered_count(uid) == 4
    assert await store.unresolved_items(uid) == ["a", "b", "c", "d"]
    assert await store.registered_count(str(uuid.uuid4())) == 0


async def test_items_are_recorded_with_their_fields_as_first_registered(store: ResultsStore) -> None:
    """What re-dispatch builds tasks from: each unresolved item as dispatch recorded it, fields
    included (NaN as its task carries it, a NUL escaped), whatever a later registration says."""
    uid = str(uuid.uuid4())
    first = [
        {"id": "a", "page": 1, "tags": ["x", "y"]},
        {"id": "b", "note": "nul\x00 inside", "score": float("nan")},
        "c",
        {"id": "d"},
    ]
    await store.register_items(uid, first)
    await store.register_items(uid, [{"id": "a", "page": 99}, "b", {"id": "e", "page": 5}])  # resumed, edited
    await store.upsert([result(uid, "d", OK)])
    assert await store.unresolved_item_records(uid) == [
        {"id": "a", "page": 1, "tags": ["x", "y"]},
        {"id": "b", "note": "nul\x00 inside", "score": None},
        {"id": "c"},
        {"id": "e", "page": 5},
    ]
    assert await store.unresolved_items(uid) == ["a", "b", "c", "e"]


async def test_register_items_refuses_unstorable_ids_atomically(store: ResultsStore) -> None:
    uid = str(uuid.uuid4())
    with pytest.raises(ValueError, match="not storable"):
        await store.register_items(uid, ["fine", "nul\x00id"])
    assert await store.registered_count(uid) == 0


async def test_unresolved_items_are_the_registered_ones_without_a_result(store: ResultsStore) -> None:
    uid = await new_job(store, ["d", "a", "c", "b"])
    other = await new_job(store, ["a", "c"])
    await store.upsert([result(uid, "b", OK), result(uid, "d", FAILED), result(other, "a", OK)])
    assert await store.unresolved_items(uid) == ["a", "c"]
    assert await store.unresolved_items(other) == ["c"]
    assert await store.unresolved_items(str(uuid.uuid4())) == []
    await store.upsert([result(uid, "a", OK), result(uid, "c", OK)])
    assert await store.unresolved_items(uid) == []


async def test_upsert_refuses_unknown_jobs_and_non_items_in_the_same_statement(store: ResultsStore) -> None:
    uid = await new_job(store, ["a", "b"])
    stranger = str(uuid.uuid4())
    out = await store.upsert(
        [
            result(uid, "forged", FAILED, error="forged"),
            result(uid, "a", OK),
            result(stranger, "a", FAILED, error="forged"),
            result(uid, "forged", FAILED, error="again"),
        ]
    )
    assert out.stored == {(uid, "a"): OK}
    assert out.not_an_item == {(uid, "forged")}
    assert out.unknown_job == {(stranger, "a")}
    assert out.refusal((uid, "a")) is None
    assert (out.refusal((uid, "forged")) or "").startswith("not an item")
    assert (out.refusal((stranger, "a")) or "").startswith("unknown job")
    assert await store.count(uid) == (1, 0)
    assert await store.count(stranger) == (0, 0)
    assert await store.item_outcomes(uid) == {"a": "succeeded"}

    # Ids compare as text, exactly: a look-alike of a real item is not that item.
    out = await store.upsert([result(uid, "b ", FAILED), result(uid, "B", FAILED), result(uid, "b", OK)])
    assert out.stored == {(uid, "b"): OK}
    assert out.not_an_item == {(uid, "b "), (uid, "B")}


async def test_forged_failure_never_replaces_the_first_genuine_outcome(store: ResultsStore) -> None:
    uid = await new_job(store, ["a"])
    await store.upsert([result(uid, "a", OK, result={"genuine": True})])
    out = await store.upsert([result(uid, "a", FAILED, error="forged")])
    assert out.stored == {(uid, "a"): OK}  # the caller is told what stands, not what it sent
    assert await store.item_outcomes(uid) == {"a": "succeeded"}


async def test_register_100k_items(store: ResultsStore) -> None:
    """The size dispatch must handle; the time is printed (run with -s), never asserted."""
    uid = str(uuid.uuid4())
    ids = [f"image-{n:07d}.jpg" for n in range(100_000)]
    started = time.monotonic()
    await store.register_items(uid, ids)
    first = time.monotonic() - started
    started = time.monotonic()
    await store.register_items(uid, ids)  # resumed dispatch: everything already there
    again = time.monotonic() - started
    print(f"register_items 100k: {first:.2f}s first, {again:.2f}s again")
    assert await store.registered_count(uid) == 100_000
    await store.upsert([result(uid, ids[n], OK) for n in range(0, 100_000, 2)])
    unresolved = await store.unresolved_items(uid)
    assert len(unresolved) == 50_000 and unresolved[0] == ids[1]


async def test_dead_letters_are_stored_in_one_batch_in_order(store: ResultsStore) -> None:
    marker = uuid.uuid4().hex
    subject = f"mljob.results.{marker}"
    await store.dead_letters("collector", [(subject, b"one", "r1"), (subject, b"\x00two", "r\x002")])
    await store.dead_letters("collector", [])
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT source, payload, reason FROM mljob_dead_letters WHERE subject = %s ORDER BY id",
            (subject,),
        )
        rows = await cur.fetchall()
    assert rows == [("collector", b"one", "r1"), ("collector", b"\x00two", "r\\x002")]
