"""Items NATS gave up on (rows 2, 3), against REAL NATS JetStream, Redis and Postgres.

A job stream made by the operator's own adapter, a task NAKed until its deliveries are
exhausted, and the ExhaustedDeliveries loop turning the server's max-deliveries advisory into a
failed item. Each test reads the advisories through a durable consumer of its own on the shared
advisory stream, created before the advisory it waits for, so tests never steal each other's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import psycopg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from mljob import ledger, protocol
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore
from mljob.controller.exhausted import REASON, ExhaustedDeliveries
from support.exhausting import (
    ADVISORY_PREFIX,
    PIPELINE,
    WAIT_SECONDS,
    NewJob,
    result_row,
    running,
)
from support.waiting import eventually


async def test_exhausted_item_is_failed_counted_and_its_message_deleted(
    nc: NATS, advisories: str, store: ResultsStore, state: JobState, new_job: NewJob
) -> None:
    js = nc.jetstream()
    job = await new_job(["a", "b", "c"], "b")
    woken: list[str] = []
    loop = ExhaustedDeliveries(js, nc, store, state, on_failed=woken.append, consumer=advisories)
    async with running(loop):
        deliveries, exhausted_at = await job.exhaust("b")
        row = await eventually(
            lambda: result_row(store, job.uid, "b"), WAIT_SECONDS, interval=0.02, what="b's failed row"
        )
        failed_at = time.monotonic()
        await eventually(
            lambda: _not(job.message_exists("b")),
            WAIT_SECONDS,
            interval=0.02,
            what="b's task message to be deleted",
        )
    print(f"\nexhaustion -> failed row: {failed_at - exhausted_at:.3f}s (polling every 20 ms)")
    assert deliveries == 2
    outcome, error, attempts = row
    assert (outcome, attempts) == ("failed", 2)
    assert error is not None and error.startswith(f"{REASON}: ") and "delivered 2 times" in error
    assert await state.failed_ids(job.uid) == {"b"}
    assert await state.pending_ids(job.uid) == {"a", "c"}
    assert woken == [job.uid]


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


async def test_advisory_published_while_the_loop_is_down_is_handled_when_it_starts(
    nc: NATS, advisories: str, store: ResultsStore, state: JobState, new_job: NewJob
) -> None:
    js = nc.jetstream()
    job = await new_job(["a", "b"], "a")
    await job.exhaust("a")  # the advisory is published while nothing consumes advisories
    assert await result_row(store, job.uid, "a") is None
    async with running(ExhaustedDeliveries(js, nc, store, state, consumer=advisories)):
        row = await eventually(
            lambda: result_row(store, job.uid, "a"), WAIT_SECONDS, interval=0.02, what="a's failed row"
        )
    assert row[0] == "failed" and row[1] is not None and row[1].startswith(REASON)
    assert await state.failed_ids(job.uid) == {"a"}
    assert await state.pending_ids(job.uid) == {"b"}


async def test_a_real_result_recorded_first_wins_and_counts_once(
    nc: NATS, advisories: str, store: ResultsStore, state: JobState, new_job: NewJob
) -> None:
    js = nc.jetstream()
    job = await new_job(["a", "b"], "a")
    await job.exhaust("a")
    # The worker's answer to the last delivery lands just before the advisory is handled.
    real = protocol.Result(
        job_uid=job.uid, item_id="a", outcome=protocol.Outcome.SUCCEEDED, result={"ok": 1}, attempts=2
    )
    await ledger.record(store, state, [real])
    async with running(ExhaustedDeliveries(js, nc, store, state, consumer=advisories)):
        await eventually(
            lambda: _not(job.message_exists("a")),
            WAIT_SECONDS,
            interval=0.02,
            what="the advisory to be handled",
        )
    row = await result_row(store, job.uid, "a")
    assert row is not None and (row[0], row[1]) == ("succeeded", None)
    assert await store.count(job.uid) == (1, 0)
    assert await state.failed_ids(job.uid) == set()
    assert await state.pending_ids(job.uid) == {"b"}


async def test_advisories_of_other_streams_and_consumers_and_malformed_ones_are_acked_and_ignored(
    nc: NATS, advisories: str, store: ResultsStore, state: JobState, new_job: NewJob
) -> None:
    js = nc.jetstream()
    job = await new_job(["a", "b"], "a")
    gone = str(uuid.uuid4())
    fakes: list[tuple[str, str, bytes]] = [
        (protocol.RESULTS_STREAM, protocol.RESULTS_CONSUMER, b""),
        (protocol.ADVISORY_STREAM, protocol.ADVISORY_CONSUMER, b""),
        ("OTHER", "c", b""),
        # b's own task, but another consumer of the pipeline's stream: b must stay pending
        (protocol.task_stream(PIPELINE), "someone-else", b""),
        # another job's consumer (finished, or a stale advisory after a recreation) naming b's
        # sequence: that sequence holds another job's task, so b stays pending
        (protocol.task_stream(PIPELINE), protocol.task_consumer(gone), b""),
        (protocol.task_stream(PIPELINE), protocol.task_consumer(job.uid), b"not json"),
        (protocol.task_stream(PIPELINE), protocol.task_consumer(job.uid), b'{"stream": 1}'),
    ]
    for stream, consumer, body in fakes:
        payload = (
            body
            or json.dumps(
                {"stream": stream, "consumer": consumer, "stream_seq": job.seqs["b"], "deliveries": 2}
            ).encode()
        )
        await nc.publish(f"{ADVISORY_PREFIX}.{stream}.{consumer}", payload)
    await nc.flush()
    async with running(ExhaustedDeliveries(js, nc, store, state, consumer=advisories)):
        await job.exhaust("a")  # a real advisory after the fakes: handled in order, after them
        await eventually(
            lambda: result_row(store, job.uid, "a"), WAIT_SECONDS, interval=0.02, what="a's failed row"
        )
        info = await eventually(
            lambda: _all_acked(js, advisories), WAIT_SECONDS, interval=0.02, what="every advisory to be acked"
        )
    assert info.num_redelivered == 0, "an ignored advisory was retried instead of acked"
    assert await result_row(store, job.uid, "b") is None
    assert await job.message_exists("b")
    assert await state.pending_ids(job.uid) == {"b"}
    assert await state.failed_ids(job.uid) == {"a"}


async def test_postgres_unavailable_nothing_acked_retried_until_recorded(
    nc: NATS, advisories: str, store: ResultsStore, state: JobState, new_job: NewJob
) -> None:
    js = nc.jetstream()
    job = await new_job(["a", "b"], "a")
    flaky = FlakyStore(store, failures=3)
    async with running(ExhaustedDeliveries(js, nc, flaky, state, consumer=advisories)):
        await job.exhaust("a")
        row = await eventually(
            lambda: result_row(store, job.uid, "a"),
            WAIT_SECONDS,
            interval=0.02,
            what="a's failed row after the outage",
        )
        await eventually(
            lambda: _all_acked(js, advisories), WAIT_SECONDS, interval=0.02, what="the advisory to be acked"
        )
    assert flaky.failures == 0
    assert row[0] == "failed"
    assert await state.failed_ids(job.uid) == {"a"}
    assert not await job.message_exists("a")


async def test_a_failure_the_ledger_refuses_keeps_the_task_and_the_advisory_is_retried(
    nc: NATS, advisories: str, store: ResultsStore, state: JobState, new_job: NewJob
) -> None:
    js = nc.jetstream()
    job = await new_job(["a", "b"], "a", registered=["b"])  # "a" is not (yet) an item of the job
    loop = ExhaustedDeliveries(js, nc, store, state, consumer=advisories, refused_retry_seconds=0.2)
    async with running(loop):
        await job.exhaust("a")

        async def refused_or_deleted() -> bool:
            info = await js.consumer_info(protocol.ADVISORY_STREAM, advisories)
            return info.num_redelivered > 0 or not await job.message_exists("a")

        await eventually(
            refused_or_deleted,
            WAIT_SECONDS,
            interval=0.02,
            what="the advisory to be retried (or a's task deleted)",
        )
        assert await job.message_exists("a"), "the task of an item whose failure was refused was deleted"
        assert await result_row(store, job.uid, "a") is None
        assert await state.pending_ids(job.uid) == {"a", "b"}

        await store.register_items(job.uid, ["a"])  # what was refused is accepted now
        row = await eventually(
            lambda: result_row(store, job.uid, "a"),
            WAIT_SECONDS,
            interval=0.02,
            what="a's failed row on a retry",
        )
        await eventually(
            lambda: _not(job.message_exists("a")),
            WAIT_SECONDS,
            interval=0.02,
            what="a's task message to be deleted",
        )
        await eventually(
            lambda: _all_acked(js, advisories), WAIT_SECONDS, interval=0.02, what="the advisory to be acked"
        )
    assert row[0] == "failed"
    assert await state.failed_ids(job.uid) == {"a"}


class FlakyStore(ResultsStore):
    """The real store, unreachable for its first `failures` writes (like Postgres restarting)."""

    def __init__(self, real: ResultsStore, failures: int) -> None:
        super().__init__(real.pool)
        self.failures = failures

    async def upsert(self, results: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise psycopg.OperationalError("connection refused (test outage)")
        return await super().upsert(results)


async def _all_acked(js: JetStreamContext, consumer: str) -> Any:
    info = await js.consumer_info(protocol.ADVISORY_STREAM, consumer)
    return info if info.num_pending == 0 and info.num_ack_pending == 0 else None
