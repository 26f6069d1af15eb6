"""Items NATS gave up on (rows 2, 3), against REAL NATS JetStream, Redis and Postgres.

A job stream made by the operator's own adapter, a task NAKed until its deliveries are
exhausted, and the ExhaustedDeliveries loop turning the server's max-deliveries advisory into a
failed item. Each test reads the advisories through a durable consumer of its own on the shared
advisory stream, created before the advisory it waits for, so tests never steal each other's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from mljob import ledger, protocol
from mljob.adapters import jetstream
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore
from mljob.controller.exhausted import REASON, ExhaustedDeliveries

WAIT_SECONDS = 30.0  # an upper bound for waiting, never a timing assertion
MAX_DELIVER = 2
ADVISORY_PREFIX = protocol.MAX_DELIVERIES_ADVISORY_SUBJECTS.removesuffix(".*.*")
PIPELINE = "exh"


@pytest.fixture
async def advisories(nc: NATS) -> AsyncIterator[str]:
    """A durable advisory consumer of this test only (new advisories from now on)."""
    js = nc.jetstream()
    await jetstream.ensure_advisory_stream(js)
    name = f"test-{uuid.uuid4().hex[:10]}"
    await js.add_consumer(
        protocol.ADVISORY_STREAM,
        ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            max_deliver=-1,
            ack_wait=30.0,
        ),
    )
    yield name
    await js.delete_consumer(protocol.ADVISORY_STREAM, name)


class NewJob(Protocol):
    def __call__(
        self, items: list[str], first: str, registered: list[str] | None = None
    ) -> Awaitable[Job]: ...


@dataclass
class Job:
    """A job stream with one task per item, its items registered in Postgres and Redis."""

    nc: NATS
    js: JetStreamContext
    uid: str
    items: list[str]
    seqs: dict[str, int] = field(default_factory=dict)

    async def exhaust(self, item_id: str) -> tuple[int, float]:
        """Deliver `item_id`'s task until NATS gives up, like a worker that dies on it: NAK each
        delivery but the last, which is left unanswered (the worker "crashed" holding it).

        Keeps pulling, as live workers do, until the max-deliveries advisory is published: the
        server notices the exhaustion only when a pull request meets the expired delivery (seen
        on nats-server 2.12). Other tasks fetched meanwhile are NAKed with a long delay, so they
        keep deliveries to spare and stay pending. Returns (deliveries, monotonic time of the
        advisory).
        """
        nc = self.nc
        seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def on_advisory(_: Any) -> None:
            if not seen.done():
                seen.set_result(time.monotonic())

        watch = await nc.subscribe(
            f"{ADVISORY_PREFIX}.{protocol.task_stream(PIPELINE)}.{protocol.task_consumer(self.uid)}",
            cb=on_advisory,
        )
        await nc.flush()
        sub = await self.js.pull_subscribe_bind(
            durable=protocol.task_consumer(self.uid), stream=protocol.task_stream(PIPELINE)
        )
        deliveries = 0
        deadline = time.monotonic() + WAIT_SECONDS
        try:
            while not seen.done():
                if time.monotonic() > deadline:
                    raise AssertionError(f"no max-deliveries advisory for {item_id} after {WAIT_SECONDS}s")
                try:
                    msgs = await sub.fetch(1, timeout=0.2)
                except TimeoutError:
                    continue
                for msg in msgs:
                    if msg.metadata.sequence.stream != self.seqs[item_id]:
                        await msg.nak(delay=600)
                        continue
                    deliveries = int(msg.metadata.num_delivered)
                    if deliveries < MAX_DELIVER:
                        await msg.nak()
            return deliveries, seen.result()
        finally:
            await sub.unsubscribe()
            await watch.unsubscribe()

    async def message_exists(self, item_id: str) -> bool:
        return await jetstream.get_task_message(self.js, PIPELINE, self.uid, self.seqs[item_id]) is not None


@pytest.fixture
async def new_job(nc: NATS, store: ResultsStore, state: JobState) -> AsyncIterator[NewJob]:
    """Makes jobs: a stream with one task per item, `first` published first; items registered
    in Postgres (when the ledger has a registry) and in Redis. Their streams are deleted after."""
    js = nc.jetstream()
    made: list[str] = []

    async def make(items: list[str], first: str, registered: list[str] | None = None) -> Job:
        uid = str(uuid.uuid4())
        made.append(uid)
        settings = jetstream.JobStreamSettings(
            uid=uid,
            namespace="ns",
            name="exh",
            pipeline=PIPELINE,
            max_deliver=MAX_DELIVER,
            ack_wait_seconds=2.0,
        )
        await jetstream.ensure_job_stream(js, settings)
        register = getattr(store, "register_items", None)
        if register is not None:  # a ledger with an item registry accepts outcomes only for items
            await register(uid, items if registered is None else registered)
        assert await state.initialize(uid, items)
        job = Job(nc, js, uid, items)
        for item_id in [first, *(i for i in items if i != first)]:
            task = protocol.Task(
                job=protocol.JobRef(uid=uid, namespace="ns", name="exh", pipeline="exh"), item={"id": item_id}
            )
            ack = await js.publish(
                protocol.task_subject("exh", uid),
                task.encode(),
                headers={protocol.MSG_ID_HEADER: protocol.task_msg_id(uid, item_id)},
            )
            job.seqs[item_id] = ack.seq
        return job

    yield make
    for uid in made:
        await jetstream.delete_job_tasks(js, PIPELINE, uid)


@asynccontextmanager
async def running(loop: ExhaustedDeliveries) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert task.exception() is None


async def wait_until(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECONDS:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def result_row(store: ResultsStore, uid: str, item_id: str) -> tuple[str, str | None, int] | None:
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT outcome, error, attempts FROM mljob_results WHERE job_uid = %s AND item_id = %s",
            (uid, item_id),
        )
        row = await cur.fetchone()
    return (row[0], row[1], row[2]) if row else None


async def test_exhausted_item_is_failed_counted_and_its_message_deleted(
    nc: NATS, advisories: str, store: ResultsStore, state: JobState, new_job: NewJob
) -> None:
    js = nc.jetstream()
    job = await new_job(["a", "b", "c"], "b")
    woken: list[str] = []
    loop = ExhaustedDeliveries(js, nc, store, state, on_failed=woken.append, consumer=advisories)
    async with running(loop):
        deliveries, exhausted_at = await job.exhaust("b")
        row = await wait_until(lambda: result_row(store, job.uid, "b"), "b's failed row")
        failed_at = time.monotonic()
        await wait_until(lambda: _not(job.message_exists("b")), "b's task message to be deleted")
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
        row = await wait_until(lambda: result_row(store, job.uid, "a"), "a's failed row")
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
        await wait_until(lambda: _not(job.message_exists("a")), "the advisory to be handled")
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
        await wait_until(lambda: result_row(store, job.uid, "a"), "a's failed row")
        info = await wait_until(lambda: _all_acked(js, advisories), "every advisory to be acked")
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
        row = await wait_until(lambda: result_row(store, job.uid, "a"), "a's failed row after the outage")
        await wait_until(lambda: _all_acked(js, advisories), "the advisory to be acked")
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

        await wait_until(refused_or_deleted, "the advisory to be retried (or a's task deleted)")
        assert await job.message_exists("a"), "the task of an item whose failure was refused was deleted"
        assert await result_row(store, job.uid, "a") is None
        assert await state.pending_ids(job.uid) == {"a", "b"}

        await store.register_items(job.uid, ["a"])  # what was refused is accepted now
        row = await wait_until(lambda: result_row(store, job.uid, "a"), "a's failed row on a retry")
        await wait_until(lambda: _not(job.message_exists("a")), "a's task message to be deleted")
        await wait_until(lambda: _all_acked(js, advisories), "the advisory to be acked")
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
