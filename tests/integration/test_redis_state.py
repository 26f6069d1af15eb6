"""Per-job item state in a REAL Redis (the stack's), isolated by a per-test key prefix.

Covers failure-modes rows 1 (a replayed result counts once), 8 (missing state is never
"complete"), 9 (state is complete before it is visible) and 10 (results without state create
nothing).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, cast, overload

import pytest
from redis.asyncio import Redis

from mljob.adapters import redis_state
from mljob.adapters.redis_state import STAGING_TTL_SECONDS, JobState, RecordStatus
from mljob.core.counts import Completeness, completeness
from support.stack import StackEnv


def new_uid() -> str:
    return str(uuid.uuid4())


async def keys_of(redis: Redis, prefix: str, uid: str) -> list[str]:
    return [k async for k in redis.scan_iter(match=f"{prefix}:{{{uid}}}*", count=1000)]


class ExplodingIds(Sequence[str]):
    """Item ids that cannot be read from `fail_from` on: an initializer interrupted half-way."""

    def __init__(self, ids: list[str], fail_from: int) -> None:
        self.ids = ids
        self.fail_from = fail_from

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice) and (index.start or 0) >= self.fail_from:
            raise RuntimeError("operator crashed while registering items")
        return self.ids[index]


async def test_initialize_registers_every_item_and_total(state: JobState) -> None:
    uid = new_uid()
    ids = [f"img-{i}" for i in range(12_345)]
    assert await state.initialize(uid, ids, chunk=1000) is True
    counts = await state.counts(uid)
    assert counts is not None
    assert (counts.total, counts.pending, counts.failed, counts.last_activity) == (12_345, 12_345, 0, None)
    assert completeness(counts) is Completeness.INCOMPLETE
    assert await state.pending_ids(uid) == set(ids)
    assert await state.failed_ids(uid) == set()


async def test_keys_share_the_job_hash_tag(state: JobState, prefix: str) -> None:
    uid = new_uid()
    keys = state.keys(uid)
    for key in keys.all():
        assert key.startswith(f"{prefix}:{{{uid}}}:")
    assert len(set(keys.all())) == 4


async def test_initialize_twice_does_not_reset_progress(state: JobState) -> None:
    uid = new_uid()
    assert await state.initialize(uid, ["a", "b", "c"]) is True
    await state.record([(uid, "a", False), (uid, "b", True)], now=100.0)
    assert await state.initialize(uid, ["a", "b", "c", "d"]) is False
    counts = await state.counts(uid)
    assert counts is not None
    assert (counts.total, counts.pending, counts.failed) == (3, 1, 1)
    assert await state.pending_ids(uid) == {"c"}


async def test_interrupted_initialize_leaves_no_visible_state(
    state: JobState, redis: Redis, prefix: str
) -> None:
    uid = new_uid()
    ids = [f"i{n}" for n in range(250)]
    with pytest.raises(RuntimeError):  # after 10 chunks of 10 were written, in one round trip
        await state.initialize(uid, ExplodingIds(ids, fail_from=150), chunk=10)
    # Nothing a reader could mistake for a job: no total, no pending, counts say "missing".
    assert await state.counts(uid) is None
    assert completeness(await state.counts(uid)) is Completeness.STATE_MISSING
    keys = state.keys(uid)
    assert await redis.exists(keys.total, keys.pending, keys.failed, keys.activity) == 0
    # The half-written staging set expires by itself.
    leftovers = await keys_of(redis, prefix, uid)
    assert len(leftovers) == 1 and ":staging:" in leftovers[0]
    assert await cast(Awaitable[int], redis.scard(leftovers[0])) == 100
    assert 0 < await redis.ttl(leftovers[0]) <= STAGING_TTL_SECONDS
    # A retry registers everything.
    assert await state.initialize(uid, ids, chunk=10) is True
    counts = await state.counts(uid)
    assert counts is not None and (counts.total, counts.pending) == (250, 250)


async def test_initialize_replaces_partial_leftovers(state: JobState, redis: Redis) -> None:
    """Sets left without a total (an older, interrupted writer) are not merged into the job."""
    uid = new_uid()
    keys = state.keys(uid)
    await cast(Awaitable[int], redis.sadd(keys.pending, "stale-1", "a"))
    await cast(Awaitable[int], redis.sadd(keys.failed, "a"))
    await redis.set(keys.activity, "5.0")
    assert await state.counts(uid) is None
    assert await state.initialize(uid, ["a", "b"]) is True
    assert await state.pending_ids(uid) == {"a", "b"}
    assert await state.failed_ids(uid) == set()
    counts = await state.counts(uid)
    assert counts is not None
    assert (counts.total, counts.pending, counts.failed, counts.last_activity) == (2, 2, 0, None)


async def test_concurrent_initializers_register_once(state: JobState) -> None:
    uid = new_uid()
    ids = [f"x{n}" for n in range(20_000)]
    won = await asyncio.gather(*(state.initialize(uid, ids, chunk=500) for _ in range(4)))
    assert won.count(True) == 1
    counts = await state.counts(uid)
    assert counts is not None and (counts.total, counts.pending) == (20_000, 20_000)


async def test_duplicate_ids_count_once(state: JobState) -> None:
    uid = new_uid()
    assert await state.initialize(uid, ["a", "b", "a"]) is True
    counts = await state.counts(uid)
    assert counts is not None and (counts.total, counts.pending) == (2, 2)


async def test_empty_job_is_complete_not_missing(state: JobState) -> None:
    uid = new_uid()
    assert await state.initialize(uid, []) is True
    counts = await state.counts(uid)
    assert counts is not None and (counts.total, counts.pending) == (0, 0)
    assert completeness(counts) is Completeness.COMPLETE


async def test_counts_is_none_when_state_missing(state: JobState) -> None:
    uid = new_uid()
    assert await state.counts(uid) is None
    await state.initialize(uid, ["a"])
    await state.record([(uid, "a", False)], now=1.0)
    counts = await state.counts(uid)
    assert counts is not None and completeness(counts) is Completeness.COMPLETE
    await state.delete(uid)
    assert await state.counts(uid) is None
    assert completeness(await state.counts(uid)) is Completeness.STATE_MISSING


async def test_replayed_result_counts_once(state: JobState) -> None:
    uid = new_uid()
    await state.initialize(uid, ["a", "b", "c"])
    first = await state.record([(uid, "a", False), (uid, "b", True)], now=1000.5)
    assert [(o.item_id, o.status, o.pending_left) for o in first] == [
        ("a", RecordStatus.NEW, 2),
        ("b", RecordStatus.NEW, 1),
    ]
    replay = await state.record([(uid, "a", False), (uid, "b", True)], now=2000.0)
    assert [(o.item_id, o.status, o.pending_left) for o in replay] == [
        ("a", RecordStatus.DUPLICATE, 1),
        ("b", RecordStatus.DUPLICATE, 1),
    ]
    counts = await state.counts(uid)
    assert counts is not None
    assert (counts.total, counts.pending, counts.failed, counts.processed, counts.succeeded) == (
        3,
        1,
        1,
        2,
        1,
    )
    assert counts.last_activity == 1000.5  # a duplicate is not activity
    assert await state.failed_ids(uid) == {"b"}
    assert await state.pending_ids(uid) == {"c"}


async def test_replay_within_one_call_and_last_item(state: JobState) -> None:
    uid = new_uid()
    await state.initialize(uid, ["a", "b"])
    out = await state.record([(uid, "a", True), (uid, "a", False), (uid, "b", False)], now=7.0)
    assert [(o.status, o.pending_left) for o in out] == [
        (RecordStatus.NEW, 1),
        (RecordStatus.DUPLICATE, 1),
        (RecordStatus.NEW, 0),
    ]
    assert await state.failed_ids(uid) == {"a"}  # the first outcome stands


async def test_a_batch_of_several_jobs_answers_each_entry_in_its_order(state: JobState) -> None:
    one, two, gone = new_uid(), new_uid(), new_uid()
    await state.initialize(one, ["a", "b"])
    await state.initialize(two, ["a", "x", "y"])
    out = await state.record(
        [
            (one, "a", False),
            (two, "x", True),
            (gone, "a", False),
            (one, "a", True),  # a replay, after another job's entry
            (two, "a", False),
            (one, "b", False),
        ],
        now=9.0,
    )
    assert [(o.uid, o.item_id, o.status, o.pending_left) for o in out] == [
        (one, "a", RecordStatus.NEW, 1),
        (two, "x", RecordStatus.NEW, 2),
        (gone, "a", RecordStatus.NO_STATE, None),
        (one, "a", RecordStatus.DUPLICATE, 1),
        (two, "a", RecordStatus.NEW, 1),
        (one, "b", RecordStatus.NEW, 0),
    ]
    assert (await state.failed_ids(one), await state.failed_ids(two)) == (set(), {"x"})
    for uid in (one, two):
        counts = await state.counts(uid)
        assert counts is not None and counts.last_activity == 9.0


async def test_record_survives_a_flushed_script_cache(state: JobState, redis: Redis) -> None:
    uid = new_uid()
    await state.initialize(uid, ["a", "b"])
    await redis.script_flush()  # a Redis restart or SCRIPT FLUSH forgets the loaded script
    out = await state.record([(uid, "a", False), (uid, "b", True)], now=3.0)
    assert [(o.status, o.pending_left) for o in out] == [(RecordStatus.NEW, 1), (RecordStatus.NEW, 0)]
    assert await state.failed_ids(uid) == {"b"}


async def test_activity_never_goes_backwards(state: JobState) -> None:
    uid = new_uid()
    await state.initialize(uid, ["a", "b"])
    await state.record([(uid, "a", False)], now=500.0)
    await state.record([(uid, "b", False)], now=400.0)  # a replica with a slower clock
    counts = await state.counts(uid)
    assert counts is not None and counts.last_activity == 500.0


async def test_results_without_state_create_no_keys(state: JobState, redis: Redis, prefix: str) -> None:
    early = new_uid()
    out = await state.record([(early, "a", False), (early, "b", True)], now=1.0)
    assert [(o.status, o.pending_left) for o in out] == [(RecordStatus.NO_STATE, None)] * 2
    assert await keys_of(redis, prefix, early) == []
    # ... and after cleanup (a late result) the job stays gone.
    late = new_uid()
    await state.initialize(late, ["a", "b"])
    await state.record([(late, "a", False)], now=1.0)
    await state.delete(late)
    out = await state.record([(late, "b", True)], now=2.0)
    assert out[0].status is RecordStatus.NO_STATE
    assert await keys_of(redis, prefix, late) == []
    assert await state.mark_failed(late, ["b"], now=3.0) == 0
    assert await keys_of(redis, prefix, late) == []


async def test_mark_failed_only_fails_pending_items(state: JobState) -> None:
    uid = new_uid()
    await state.initialize(uid, ["a", "b", "c", "d"])
    await state.record([(uid, "a", False)], now=1.0)
    assert await state.mark_failed(uid, ["a", "b", "c", "unknown"], now=2.0) == 2
    assert await state.mark_failed(uid, ["b"], now=3.0) == 0
    assert await state.failed_ids(uid) == {"b", "c"}
    assert await state.pending_ids(uid) == {"d"}
    counts = await state.counts(uid)
    assert counts is not None and (counts.pending, counts.failed, counts.last_activity) == (1, 2, 2.0)


async def test_delete_is_idempotent(state: JobState, redis: Redis, prefix: str) -> None:
    uid = new_uid()
    await state.initialize(uid, ["a", "b"])
    await state.record([(uid, "a", True)], now=1.0)
    await state.delete(uid)
    await state.delete(uid)
    assert await keys_of(redis, prefix, uid) == []


async def test_large_record_batch_in_pipelined_chunks(state: JobState) -> None:
    uid = new_uid()
    ids = [str(n) for n in range(2500)]
    await state.initialize(uid, ids)
    out = await state.record([(uid, i, int(i) % 10 == 0) for i in ids], now=3.0)
    assert [o.status for o in out] == [RecordStatus.NEW] * 2500
    assert out[-1].pending_left == 0
    counts = await state.counts(uid)
    assert counts is not None and (counts.pending, counts.failed) == (0, 250)


async def test_works_with_bytes_responses(stack: StackEnv, prefix: str) -> None:
    client = Redis.from_url(stack.redis_url, decode_responses=False)
    try:
        state = JobState(client, prefix=prefix)
        uid = new_uid()
        assert await state.initialize(uid, ["a", "b"]) is True
        out = await state.record([(uid, "a", True)], now=12.25)
        assert out[0].status is RecordStatus.NEW
        counts = await state.counts(uid)
        assert counts is not None
        assert (counts.total, counts.pending, counts.failed, counts.last_activity) == (2, 1, 1, 12.25)
        assert await state.pending_ids(uid) == {"b"}
        assert await state.failed_ids(uid) == {"a"}
    finally:
        await client.aclose()


async def test_many_callers_at_once_wait_for_a_connection_instead_of_failing(stack: StackEnv) -> None:
    """A thousand job loops ticking together: redis-py's default pool raised MaxConnectionsError
    past 100 calls at once; the operator's pool makes the 101st wait for a free connection."""
    client = redis_state.connect(stack.redis_url, max_connections=4)
    state = JobState(client, prefix=f"t{uuid.uuid4().hex[:8]}")
    uid = new_uid()
    try:
        await state.initialize(uid, ["a", "b"])
        counts = await asyncio.gather(*(state.counts(uid) for _ in range(300)))
        assert {(c.total, c.pending) for c in counts if c is not None} == {(2, 2)}
        assert len(counts) == 300
        assert len(client.connection_pool._in_use_connections) == 0
    finally:
        await state.delete(uid)
        await client.aclose()
