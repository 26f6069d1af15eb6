"""The exhausted-deliveries tests' world against REAL NATS, Redis and Postgres: a job stream made
by the operator's own adapter with one task per item, a way to exhaust an item's deliveries as a
worker dying on it would, and the ExhaustedDeliveries loop run in the background. The fixtures
(`advisories`, `new_job`) are in tests/integration/conftest.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore
from mljob.controller.exhausted import ExhaustedDeliveries

WAIT_SECONDS = 30.0  # an upper bound for waiting, never a timing assertion
MAX_DELIVER = 2
ADVISORY_PREFIX = protocol.MAX_DELIVERIES_ADVISORY_SUBJECTS.removesuffix(".*.*")
PIPELINE = "exh"


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


async def result_row(store: ResultsStore, uid: str, item_id: str) -> tuple[str, str | None, int] | None:
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT outcome, error, attempts FROM mljob_results WHERE job_uid = %s AND item_id = %s",
            (uid, item_id),
        )
        row = await cur.fetchone()
    return (row[0], row[1], row[2]) if row else None


async def make_job(
    nc: NATS,
    store: ResultsStore,
    state: JobState,
    items: list[str],
    first: str,
    registered: list[str] | None = None,
) -> Job:
    """A job stream with one task per item, `first` published first; items registered in Postgres
    (when the ledger has a registry: only those of `registered` if given) and in Redis."""
    js = nc.jetstream()
    uid = str(uuid.uuid4())
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
