"""End-to-end baseline with no framework: the same NATS, Redis and Postgres work per item as mljob,
done the fastest correct way we know on these servers.

The guarantees mljob gives, kept here: every task durable in the stream before it counts, every
result durable in the results stream before its task is acked, one Postgres row per item (a
redelivered result changes nothing), the Redis pending set updated per item, no wait without a
bound. Three roles, each its own process and NATS identity, as in mljob, on mljob's stream,
consumer and subject names (bench/wire.py). Per role, each choice and why it keeps them:

* producer (mljob: the operator's dispatch): adds the N item ids to a Redis pending set (SADDs of
  5,000 ids, ten per round trip) before any task exists, so no result can arrive for an item
  not yet pending; then publishes the N tasks as bench/baseline_dispatch.py's limit row does
  (`publish_async` in nats-py's window, no per-message timer, one bounded wait for every PubAck).
* K workers (mljob: `mljob worker`): fetch loops per process (`--concurrency` / `--batch`), each:
  pull up to `--batch` tasks of the job's durable consumer (through `mljob.transport.jspull`, which takes
  a delivered batch in one turn of the event loop: nats-py's `fetch` takes one per message);
  run the handler on all of them at once (the no-op, or `--handler-ms` of `asyncio.sleep`: up
  to loops x batch tasks in flight per worker);
  publish every result of the batch with `publish_async` (each with its `Nats-Msg-Id`, so a
  redelivered task's result is dropped by the stream) and wait once, bounded, for all their
  PubAcks; then ack each task whose result was confirmed with a plain ack. A plain ack is
  enough: if it is lost the task is redelivered after `ack_wait`, its result is deduplicated by
  the stream and by the collector's `ON CONFLICT`, so nothing counts twice; a confirmed
  `ack_sync` per task would only add a round trip each. A task whose result was not confirmed
  is NAKed (redelivered). Several loops keep the stream busy while one loop waits for acks.
* collector (mljob: the collector): `--collector-loops` loops, each with its own Postgres
  connection and puller, as the workers': fetch up to `--collector-batch` results of the
  collector's consumer of the shared results stream; store the batch with one `INSERT ...
  SELECT FROM unnest(...) ON CONFLICT DO NOTHING` (one round trip, keyed (job, item): a result
  stored twice is one row) and one Redis pipeline (SREM of the batch's items and SCARD); only
  then plain-ack the batch (lost acks: redelivery, idempotent as above). It says "done" when
  the pending set is empty.

Not done here and done by mljob: validating messages against a schema, checking results against
the registered items, the failed-item set, heartbeats, metrics, status. The clock runs from "go"
to the producer (apply) until the collector found the pending set empty (every result stored).

    python -m bench.baseline_raw --items 20000 --workers 1,2,4 [--handler-ms 20 --concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from pydantic_core import from_json, to_json

from mljob.transport.jspull import JobPuller

from . import common, wire
from .baseline_dispatch import publish_async_all

PIPELINE = "bench-raw"
TABLE = "bench_raw_results"
INSERT = f"""
INSERT INTO {TABLE} (job_uid, item_id, outcome, result, error, attempts, worker, finished_at)
SELECT * FROM unnest(
    %s::text[], %s::text[], %s::text[], %s::jsonb[], %s::text[], %s::int[], %s::text[], %s::timestamptz[]
)
ON CONFLICT (job_uid, item_id) DO NOTHING
"""
#: Ids per SADD and SADDs per round trip when the producer fills the pending set (as mljob).
SADD_CHUNK = 5000
SADDS_PER_ROUND_TRIP = 10
#: The bound of every wait for PubAcks of a worker's batch of results.
PUBLISH_TIMEOUT_SECONDS = 10.0


def pending_key(job: wire.Job) -> str:
    return f"bench:raw:{{{job.uid}}}:pending"


# ---------------------------------------------------------------------- roles
async def batches(nc: Any, stream: str, consumer: str, batch: int) -> AsyncIterator[list[Any]]:
    """Batches of a durable consumer, forever, through an inbox of this loop's own: mljob's
    puller (`mljob.transport.jspull`), whose callback subscription takes a delivered batch in one turn of
    the event loop; nats-py's `fetch` takes one turn per message."""
    puller = JobPuller(nc, stream, consumer)
    await puller.start()
    while True:
        msgs = await puller.fetch(batch, linger=1.0)
        if msgs:
            yield msgs


async def producer(job: wire.Job, items: int) -> None:
    from redis.asyncio import Redis

    nc = await common.nats_connect(f"bench-raw-producer-{os.getpid()}")
    js = nc.jetstream()
    redis = Redis.from_url(os.environ["MLJOB_REDIS_URL"])
    await redis.ping()
    common.role_say("ready")
    await asyncio.to_thread(common.role_wait_go)
    ids = [common.item(i)["id"] for i in range(items)]
    async with redis.pipeline(transaction=False) as pipe:
        for n, start in enumerate(range(0, items, SADD_CHUNK), 1):
            pipe.sadd(pending_key(job), *ids[start : start + SADD_CHUNK])
            if n % SADDS_PER_ROUND_TRIP == 0:
                await pipe.execute()
        await pipe.execute()
    await publish_async_all(js, job, items, common.stage_timeout(items))
    common.role_say("published", time.monotonic())
    await asyncio.to_thread(common.role_wait_go)  # stay (and countable) until stopped


async def worker(job: wire.Job, batch: int, loops: int, handler_ms: float) -> None:
    nc = await common.nats_connect(f"bench-raw-worker-{os.getpid()}")
    js = nc.jetstream()
    worker_id = f"bench-raw-{os.getpid()}"
    subject, uid = job.results_subject, job.uid

    async def handle(msg: Any) -> tuple[Any, bytes, str]:
        item_id = from_json(msg.data)["item"]["id"]
        if handler_ms:
            await asyncio.sleep(handler_ms / 1000)
        result = {
            "version": 2,
            "job_uid": uid,
            "item_id": item_id,
            "outcome": "succeeded",
            "result": None,  # the handler's value
            "error": None,
            "attempts": msg.metadata.num_delivered,
            "worker": worker_id,
            "finished_at": datetime.now(UTC).isoformat(),
        }
        return msg, to_json(result), f"result:{uid}:{item_id}"

    async def loop() -> None:
        async for msgs in batches(nc, job.task_stream, job.task_consumer, batch):
            done = await asyncio.gather(*(handle(m) for m in msgs))
            acks = {
                await js.publish_async(subject, body, headers={"Nats-Msg-Id": msg_id}): msg
                for msg, body, msg_id in done
            }
            confirmed, missing = await asyncio.wait(acks, timeout=PUBLISH_TIMEOUT_SECONDS)
            for future in missing:
                future.cancel()
            for future, msg in acks.items():
                if future in confirmed and future.exception() is None:
                    await msg.ack()
                else:
                    await msg.nak()

    common.role_say("ready")
    await asyncio.gather(*(loop() for _ in range(loops)))


async def collector(job: wire.Job, batch: int, loops: int) -> None:
    import psycopg
    from redis.asyncio import Redis

    nc = await common.nats_connect(f"bench-raw-collector-{os.getpid()}")
    dsn = os.environ["MLJOB_POSTGRES_DSN"]
    connections = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(loops)]
    redis = Redis.from_url(os.environ["MLJOB_REDIS_URL"])
    await redis.ping()
    done = asyncio.Event()

    async def loop(pg: Any) -> None:
        async for msgs in batches(nc, wire.RESULTS_STREAM, wire.RESULTS_CONSUMER, batch):
            results = [from_json(m.data) for m in msgs]
            columns: tuple[list[Any], ...] = (
                [r["job_uid"] for r in results],
                [r["item_id"] for r in results],
                [r["outcome"] for r in results],
                [None if r["result"] is None else to_json(r["result"]).decode() for r in results],
                [r["error"] for r in results],
                [r["attempts"] for r in results],
                [r["worker"] for r in results],
                [datetime.fromisoformat(r["finished_at"]) for r in results],
            )
            await pg.execute(INSERT, columns)
            async with redis.pipeline(transaction=False) as pipe:
                pipe.srem(pending_key(job), *(r["item_id"] for r in results))
                pipe.scard(pending_key(job))
                _, left = await pipe.execute()
            for m in msgs:
                await m.ack()
            if left == 0 and not done.is_set():
                done.set()
                common.role_say("done", time.monotonic())

    common.role_say("ready")
    await asyncio.gather(*(loop(pg) for pg in connections))


# ---------------------------------------------------------------------- the benchmark
async def setup(job: wire.Job) -> None:
    import psycopg

    nc = await common.nats_connect("bench-raw-setup")
    try:
        js = nc.jetstream()
        waiting = await wire.ensure_results(js)
        if waiting:
            raise common.BenchError(
                f"{waiting} results of another run wait in {wire.RESULTS_STREAM}: this collector would "
                "take them; run the benchmark on a stack of its own"
            )
        await wire.create_job_consumer(js, job)
    finally:
        await nc.close()
    async with await psycopg.AsyncConnection.connect(os.environ["MLJOB_POSTGRES_DSN"], autocommit=True) as pg:
        await pg.execute(common.results_table_ddl(TABLE))


async def teardown(job: wire.Job) -> None:
    """Remove what the run left: its pipeline's stream, its rows, its Redis key. The shared
    results stream and the collector's consumer stay, as mljob leaves them."""
    import psycopg
    from redis.asyncio import Redis

    nc = await common.nats_connect("bench-raw-teardown")
    try:
        await wire.delete_pipeline_stream(nc.jetstream(), job.pipeline)
    finally:
        await nc.close()
    async with await psycopg.AsyncConnection.connect(os.environ["MLJOB_POSTGRES_DSN"], autocommit=True) as pg:
        await pg.execute(f"DELETE FROM {TABLE} WHERE job_uid = %s", (job.uid,))
    redis = Redis.from_url(os.environ["MLJOB_REDIS_URL"])
    await redis.delete(pending_key(job))
    await redis.aclose()


def measure(stack: common.BenchStack, args: argparse.Namespace, workers: int) -> common.Run:
    job = wire.Job(PIPELINE, uuid.uuid4().hex[:12])
    asyncio.run(setup(job))
    base = [sys.executable, "-m", "bench.baseline_raw", "--run", job.uid, "--items", str(args.items)]
    base += ["--batch", str(args.batch), "--concurrency", str(args.concurrency)]
    base += ["--collector-batch", str(args.collector_batch), "--collector-loops", str(args.collector_loops)]
    base += ["--handler-ms", str(args.handler_ms)]
    limit = common.stage_timeout(args.items)
    try:
        with common.children() as kids:
            kids.append(
                common.Child("collector", [*base, "--role", "collector"], stack.child_env("collector"))
            )
            kids.extend(
                common.Child(f"worker-{i}", [*base, "--role", "worker"], stack.child_env("worker"))
                for i in range(workers)
            )
            kids.append(common.Child("producer", [*base, "--role", "producer"], stack.child_env()))
            for kid in kids:
                kid.expect("ready", 60)
            collector_, *workers_, producer_ = kids
            meter = common.meter(
                stack,
                {
                    "operator": [producer_.pid],
                    "collector": [collector_.pid],
                    "workers": [w.pid for w in workers_],
                },
            )
            meter.start()
            began = time.monotonic()
            producer_.send("go")
            published = float(producer_.expect("published", limit)[0])
            done = float(collector_.expect("done", limit)[0])
            cpu = meter.stop()
    finally:
        asyncio.run(teardown(job))
    return common.Run(
        benchmark="end-to-end",
        system="raw script",
        items=args.items,
        seconds=done - began,
        cpu=cpu,
        workers=workers,
        dispatch_seconds=published - began,
    )


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=20_000)
    p.add_argument("--batch", type=int, default=128, help="most tasks per worker fetch (default 128)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=512,
        help="tasks in flight per worker: concurrency / batch fetch loops (default 512)",
    )
    p.add_argument(
        "--handler-ms", type=float, default=0.0, help="the handler's asyncio.sleep (default 0: no-op)"
    )
    p.add_argument(
        "--collector-batch", type=int, default=256, help="results per collector fetch (default 256)"
    )
    p.add_argument("--collector-loops", type=int, default=2, help="collector fetch-store loops (default 2)")
    p.add_argument("--role", choices=["producer", "worker", "collector"], help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    return p


def loops_of(batch: int, concurrency: int) -> tuple[int, int]:
    """(tasks per fetch, fetch loops) for at most `concurrency` tasks in flight per worker."""
    batch = max(1, min(batch, concurrency))
    return batch, max(1, concurrency // batch)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role:
        job = wire.Job(PIPELINE, args.run)
        if args.role == "producer":
            asyncio.run(producer(job, args.items))
        elif args.role == "worker":
            asyncio.run(worker(job, *loops_of(args.batch, args.concurrency), args.handler_ms))
        else:
            asyncio.run(collector(job, args.collector_batch, args.collector_loops))
        return 0
    with common.local_stack(args) as stack:
        description = common.machine(stack)
        shown = [common.repeat(args.repeat, functools.partial(measure, stack, args, k)) for k in args.workers]
    handler = f"{args.handler_ms:g} ms handler" if args.handler_ms else "no-op handler"
    flight = f"{args.concurrency} in flight per worker"
    title = f"End-to-end baseline, raw script: {args.items:,} items, {handler}, {flight}"
    print(description + "\n\n" + common.report(title, shown, args.json_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
