"""End-to-end baseline with no framework: the same NATS, Redis and Postgres work per item as mljob.

Three roles, each its own process and NATS identity, as in mljob, on mljob's stream, consumer and
subject names (bench/wire.py):

* producer (mljob: the operator's dispatch): adds the N item ids to a Redis pending set, then
  publishes N task messages (mljob-sized, `Nats-Msg-Id`) to the job's subject of its pipeline's
  work-queue stream with `publish_async` and one wait for all acks.
* K workers (mljob: `mljob worker` with a no-op handler): pull-fetch batches from the job's
  durable consumer; per task, publish a result to the results stream and wait for its PubAck,
  then ack the task with a confirmed ack (`ack_sync`), up to `--concurrency` tasks at once.
* collector (mljob: the collector): fetches results in batches through the collector's consumer
  of the shared results stream; per batch, one `INSERT ... SELECT FROM unnest(...) ON CONFLICT
  DO NOTHING` into a table keyed (job, item), one SREM of the batch's items from the pending set
  (with SCARD in the same round trip), then acks the batch. It says "done" when the pending set
  is empty.

Not done here and done by mljob: validating messages against a schema, checking results against
the registered items, the failed-item set, heartbeats, metrics. The clock runs from "go" to the
producer (apply) until the collector found the pending set empty (every result stored).

    python -m bench.baseline_raw --items 20000 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError

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


def pending_key(job: wire.Job) -> str:
    return f"bench:raw:{{{job.uid}}}:pending"


# ---------------------------------------------------------------------- roles
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


async def worker(job: wire.Job, batch: int, concurrency: int) -> None:
    nc = await common.nats_connect(f"bench-raw-worker-{os.getpid()}")
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=job.task_consumer, stream=job.task_stream)
    slots = asyncio.Semaphore(concurrency)
    worker_id = f"bench-raw-{os.getpid()}"

    async def handle(msg: Any) -> None:
        async with slots:
            task = json.loads(msg.data)
            item_id = task["item"]["id"]
            result = {
                "version": 2,
                "job_uid": job.uid,
                "item_id": item_id,
                "outcome": "succeeded",
                "result": None,  # the no-op handler's value
                "error": None,
                "attempts": msg.metadata.num_delivered,
                "worker": worker_id,
                "finished_at": datetime.now(UTC).isoformat(),
            }
            body = json.dumps(result, separators=(",", ":")).encode()
            headers = {"Nats-Msg-Id": f"result:{job.uid}:{item_id}"}
            await js.publish(job.results_subject, body, headers=headers)
            await msg.ack_sync()

    common.role_say("ready")
    while True:
        try:
            msgs = await sub.fetch(batch, timeout=1.0)
        except NatsTimeoutError:
            continue
        await asyncio.gather(*(handle(m) for m in msgs))


async def collector(job: wire.Job, batch: int) -> None:
    import psycopg
    from redis.asyncio import Redis

    nc = await common.nats_connect(f"bench-raw-collector-{os.getpid()}")
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=wire.RESULTS_CONSUMER, stream=wire.RESULTS_STREAM)
    pg = await psycopg.AsyncConnection.connect(os.environ["MLJOB_POSTGRES_DSN"], autocommit=True)
    redis = Redis.from_url(os.environ["MLJOB_REDIS_URL"])
    await redis.ping()
    common.role_say("ready")
    announced = False
    while True:
        try:
            msgs = await sub.fetch(batch, timeout=1.0)
        except NatsTimeoutError:
            continue
        results = [json.loads(m.data) for m in msgs]
        columns: tuple[list[Any], ...] = (
            [r["job_uid"] for r in results],
            [r["item_id"] for r in results],
            [r["outcome"] for r in results],
            [None if r["result"] is None else json.dumps(r["result"]) for r in results],
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
        await nc.flush()
        if left == 0 and not announced:
            common.role_say("done", time.monotonic())
            announced = True


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
    base += ["--collector-batch", str(args.collector_batch)]
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
    p.add_argument("--batch", type=int, default=16, help="tasks per worker fetch (mljob's default: 16)")
    p.add_argument(
        "--concurrency", type=int, default=8, help="tasks in flight per worker (mljob's default: 8)"
    )
    p.add_argument(
        "--collector-batch", type=int, default=256, help="results per collector fetch (mljob's default: 256)"
    )
    p.add_argument("--role", choices=["producer", "worker", "collector"], help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role:
        job = wire.Job(PIPELINE, args.run)
        if args.role == "producer":
            asyncio.run(producer(job, args.items))
        elif args.role == "worker":
            asyncio.run(worker(job, args.batch, args.concurrency))
        else:
            asyncio.run(collector(job, args.collector_batch))
        return 0
    with common.local_stack(args) as stack:
        description = common.machine(stack)
        shown = [common.repeat(args.repeat, functools.partial(measure, stack, args, k)) for k in args.workers]
    title = f"End-to-end baseline, raw script: {args.items:,} items, no-op handler"
    print(description + "\n\n" + common.report(title, shown, args.json_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
