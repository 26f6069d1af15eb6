"""Failing pending items (deadline, stall, stream lost) in the real Postgres and Redis.

Issue 14: every pending item was failed in one statement, a million items one ~100 MB
statement retried whole. It is chunked as registration is; a small chunk size shows it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg
import pytest

from mljob import ledger, protocol
from mljob.adapters import results_store
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore, UpsertResult

CHUNK = 3
ITEMS = [f"item-{n:02d}" for n in range(10)]  # four chunks: 3 + 3 + 3 + 1


class Upserts:
    """Wraps `store.upsert`: the size of each batch, and an injected outage on call `fail_on`."""

    def __init__(self, store: ResultsStore, fail_on: int | None = None) -> None:
        self.real = store.upsert
        self.fail_on = fail_on
        self.sizes: list[int] = []

    async def __call__(self, results: Sequence[protocol.Result]) -> UpsertResult:
        self.sizes.append(len(results))
        if len(self.sizes) == self.fail_on:
            raise psycopg.OperationalError("injected: connection lost mid-failure")
        return await self.real(results)


@pytest.fixture
async def job(store: ResultsStore, state: JobState, monkeypatch: pytest.MonkeyPatch) -> str:
    """A dispatched job of ITEMS, none of them done yet, with a chunk size of CHUNK."""
    monkeypatch.setattr(results_store, "REGISTER_CHUNK", CHUNK)
    uid = str(uuid.uuid4())
    await store.register_items(uid, ITEMS)
    assert await state.initialize(uid, ITEMS)
    return uid


async def fail_pending(store: ResultsStore, state: JobState, uid: str) -> int:
    """What the FAIL_PENDING action does: fail what the ledger holds no outcome for."""
    return await ledger.fail_items(store, state, uid, await store.unresolved_items(uid), "Lost", "test")


async def assert_every_item_failed_once(store: ResultsStore, state: JobState, uid: str) -> None:
    assert await store.item_outcomes(uid) == dict.fromkeys(ITEMS, "failed")
    counts = await state.counts(uid)
    assert counts is not None
    assert (counts.total, counts.pending, counts.failed) == (len(ITEMS), 0, len(ITEMS))


async def test_failing_many_items_writes_them_in_chunks_and_every_one_is_failed(
    store: ResultsStore, state: JobState, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upserts = Upserts(store)
    monkeypatch.setattr(store, "upsert", upserts)
    assert await fail_pending(store, state, job) == len(ITEMS)
    assert upserts.sizes == [3, 3, 3, 1]
    await assert_every_item_failed_once(store, state, job)


async def test_a_failure_partway_keeps_the_chunks_done_and_the_retry_fails_the_rest_once(
    store: ResultsStore, state: JobState, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upserts = Upserts(store, fail_on=2)
    monkeypatch.setattr(store, "upsert", upserts)
    with pytest.raises(psycopg.OperationalError, match="injected"):
        await fail_pending(store, state, job)
    assert await store.unresolved_items(job) == ITEMS[CHUNK:]  # the first chunk stands
    assert await fail_pending(store, state, job) == len(ITEMS) - CHUNK  # the next tick's retry
    assert upserts.sizes == [3, 3, 3, 3, 1]
    await assert_every_item_failed_once(store, state, job)
    assert await fail_pending(store, state, job) == 0  # nothing left: nothing written
    assert upserts.sizes == [3, 3, 3, 3, 1]
