"""The collector tests' world against REAL NATS, Redis and Postgres: a private results stream
and durable per test (the shared MLJOB_RESULTS belongs to whatever else runs on the server),
result bodies, a Collector pointed at that stream, and what dispatch does before the first task.
The fixtures (`js`, `results`) are in tests/integration/conftest.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from mljob import protocol
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore
from mljob.collector.results import Collector

OK = protocol.Outcome.SUCCEEDED
FAILED = protocol.Outcome.FAILED
#: The pipeline of the collector tests' jobs (the second-to-last token of their result subjects).
PIPELINE = "test"


@dataclass(frozen=True)
class ResultsStream:
    """A private stand-in for MLJOB_RESULTS and its durable."""

    stream: str
    consumer: str
    prefix: str

    def subject(self, uid: str, pipeline: str = PIPELINE) -> str:
        return f"{self.prefix}.{pipeline}.{uid}"


async def make_results_stream(js: JetStreamContext, ack_wait: float = 30.0) -> ResultsStream:
    tag = uuid.uuid4().hex[:12]
    made = ResultsStream(f"MLJOB_RESULTS_T{tag}", f"collector-{tag}", f"mljob.testresults.{tag}")
    await js.add_stream(
        StreamConfig(
            name=made.stream,
            subjects=[f"{made.prefix}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.MEMORY,
        )
    )
    await js.add_consumer(
        made.stream,
        ConsumerConfig(
            durable_name=made.consumer,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=-1,
            ack_wait=ack_wait,
            max_ack_pending=20_000,
        ),
    )
    return made


@asynccontextmanager
async def running(collector: Collector) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)


async def stream_messages(js: JetStreamContext, rs: ResultsStream) -> int:
    """Messages still in the work-queue stream: acked ones are removed."""
    return int((await js.stream_info(rs.stream)).state.messages)


async def settled(js: JetStreamContext, rs: ResultsStream) -> bool:
    info = await js.consumer_info(rs.stream, rs.consumer)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0 and await stream_messages(js, rs) == 0)


def body(uid: str, item: str, outcome: protocol.Outcome, **extra: object) -> bytes:
    fields: dict[str, object] = {"job_uid": uid, "item_id": item, "outcome": outcome, **extra}
    if outcome is FAILED:
        fields.setdefault("error", "model said no")
    return protocol.Result.model_validate(fields).encode()


def collector_for(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    rs: ResultsStream,
    *,
    batch: int = 256,
    loops: int = 1,
    on_drained: Callable[[str], Awaitable[None]] | None = None,
) -> Collector:
    return Collector(
        js,
        nc,
        state,
        store,
        batch=batch,
        loops=loops,
        fetch_timeout=0.5,
        on_drained=on_drained,
        stream=rs.stream,
        consumer=rs.consumer,
        subject_prefix=rs.prefix,
    )


async def drained_listener(nc: NATS, uid: str) -> list[str]:
    """Subscribe (before anything runs) to the job's drained subject; returns the live list."""
    seen: list[str] = []

    async def on_msg(msg: Msg) -> None:
        seen.append(msg.subject)

    await nc.subscribe(protocol.drained_subject(uid), cb=on_msg)
    await nc.flush()
    return seen


async def dispatched(state: JobState, store: ResultsStore, uid: str, items: list[str]) -> bool:
    """What dispatch does before the first task goes out: items registered in the ledger (results
    for anything else are refused), then the job's Redis state."""
    await store.register_items(uid, items)
    return await state.initialize(uid, items)


async def dead_letters(store: ResultsStore) -> list[tuple[str, str, bytes, str]]:
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT source, subject, payload, reason FROM mljob_dead_letters ORDER BY id"
        )
        return [(r[0], r[1], bytes(r[2]), r[3]) for r in await cur.fetchall()]
