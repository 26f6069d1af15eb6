"""End-to-end baseline with Celery: a Redis broker, late acks, the same Redis and Postgres work per item.

* producer (mljob: the operator's dispatch): adds the N item ids to a Redis pending set, then
  sends N tasks (args: job uid, the mljob-sized item, params) with `apply_async` per task over
  one shared producer connection, or with `--dispatch group`: `group(...).apply_async()` (which
  costs the producer more CPU per task).
* K Celery workers, one process each (`celery worker -P solo`; `--prefetch` tasks reserved per
  worker, late acks): per task, the no-op handler, one `INSERT ... ON CONFLICT DO NOTHING` into a
  table keyed (job, item), one SREM (with SCARD in the same round trip) from the pending set.
  See bench/celery_app.py. Gossip, mingle, heartbeats and remote control are off: nothing here
  needs them, and they cost broker traffic.

There is no collector: Celery tasks store their own results. The clock runs from "go" to the
producer (apply) until a task found the pending set empty (every result stored).

    python -m bench.baseline_celery --items 20000 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import uuid
from typing import Any

from . import common

SADD_CHUNK = 5000


def _redis() -> Any:
    import os

    from redis import Redis

    return Redis.from_url(os.environ["MLJOB_REDIS_URL"])


# ---------------------------------------------------------------------- the producer role
def producer(job_uid: str, items: int, mode: str) -> None:
    from celery import group

    from .celery_app import app, pending_key, process

    redis = _redis()
    redis.ping()
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=3)
    common.role_say("ready")
    common.role_wait_go()
    ids = [common.item(i)["id"] for i in range(items)]
    pipe = redis.pipeline(transaction=False)
    for start in range(0, items, SADD_CHUNK):
        pipe.sadd(pending_key(job_uid), *ids[start : start + SADD_CHUNK])
    pipe.execute()
    if mode == "group":
        group(process.s(job_uid, common.item(i), common.PARAMS) for i in range(items)).apply_async()
    else:
        with app.producer_or_acquire() as shared:
            for i in range(items):
                process.apply_async((job_uid, common.item(i), common.PARAMS), producer=shared)
    common.role_say("published", time.monotonic())
    common.role_wait_go()  # stay (and countable) until stopped


# ---------------------------------------------------------------------- the benchmark
def setup() -> None:
    import os

    import psycopg

    from .celery_app import TABLE

    with psycopg.connect(os.environ["MLJOB_POSTGRES_DSN"], autocommit=True) as pg:
        pg.execute(common.results_table_ddl(TABLE).encode())


def teardown(job_uid: str, queue: str) -> None:
    import os

    import psycopg

    from .celery_app import TABLE, done_key, pending_key

    with psycopg.connect(os.environ["MLJOB_POSTGRES_DSN"], autocommit=True) as pg:
        pg.execute(f"DELETE FROM {TABLE} WHERE job_uid = %s".encode(), (job_uid,))
    redis = _redis()
    keys = [pending_key(job_uid), done_key(job_uid)]
    keys += redis.scan_iter(match=f"{queue}*")  # the queue (and its priority lists)
    keys += redis.scan_iter(match=f"_kombu.binding*.{queue}")  # kombu's routing table
    redis.delete(*keys)
    redis.close()


def wait_done(job_uid: str, timeout: float) -> float:
    from .celery_app import done_key

    redis = _redis()
    deadline = time.monotonic() + timeout
    try:
        # Short blocking pops: one long BLPOP outlives redis-py 8's socket read timeout.
        while (popped := redis.blpop([done_key(job_uid)], timeout=1)) is None:
            if time.monotonic() > deadline:
                raise common.BenchError(f"the Celery tasks did not all finish within {timeout:.0f}s")
    finally:
        redis.close()
    return float(popped[1])


def measure(stack: common.BenchStack, args: argparse.Namespace, workers: int) -> common.Run:
    job_uid = uuid.uuid4().hex[:12]
    queue = f"bench-celery-{job_uid}"
    setup()
    env = stack.child_env(BENCH_CELERY_QUEUE=queue, BENCH_CELERY_PREFETCH=str(args.prefetch))
    worker_cmd = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "--quiet", "worker"]
    worker_cmd += ["-P", "solo", "-c", "1", "-Q", queue, "-l", "WARNING"]
    worker_cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    producer_cmd = [sys.executable, "-m", "bench.baseline_celery", "--role", "producer", "--run", job_uid]
    producer_cmd += ["--items", str(args.items), "--dispatch", args.dispatch]
    limit = common.stage_timeout(args.items)
    try:
        with common.children() as kids:
            for i in range(workers):
                kids.append(common.Child(f"celery-{i}", [*worker_cmd, "-n", f"bench{i}-{job_uid}@%h"], env))
            kids.append(common.Child("producer", producer_cmd, env))
            for kid in kids:
                kid.expect("ready", 60)
            *workers_, producer_ = kids
            meter = common.meter(stack, {"operator": [producer_.pid], "workers": [w.pid for w in workers_]})
            meter.start()
            began = time.monotonic()
            producer_.send("go")
            published = float(producer_.expect("published", limit)[0])
            done = wait_done(job_uid, limit)
            cpu = meter.stop()
    finally:
        teardown(job_uid, queue)
    return common.Run(
        benchmark="end-to-end",
        system=f"Celery ({args.dispatch})",
        items=args.items,
        seconds=done - began,
        cpu=cpu,
        workers=workers,
        dispatch_seconds=published - began,
    )


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=20_000)
    p.add_argument(
        "--prefetch", type=int, default=16, help="worker_prefetch_multiplier (tasks reserved per worker)"
    )
    p.add_argument(
        "--dispatch",
        choices=["loop", "group"],
        default="loop",
        help="apply_async per task on one shared producer (default, cheaper), or group(...).apply_async()",
    )
    p.add_argument("--role", choices=["producer"], help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "producer":
        producer(args.run, args.items, args.dispatch)
        return 0
    with common.local_stack(args) as stack:
        description = common.machine(stack)
        shown = [common.repeat(args.repeat, functools.partial(measure, stack, args, k)) for k in args.workers]
    title = f"End-to-end baseline, Celery: {args.items:,} items, no-op handler"
    print(description + "\n\n" + common.report(title, shown, args.json_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
