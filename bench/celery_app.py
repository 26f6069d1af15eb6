"""The Celery application of the Celery baseline: `celery -A bench.celery_app worker ...`.

Redis is the broker (the stack's MLJOB_REDIS_URL), tasks are acknowledged late (after they
ran, so a crash redelivers them, as mljob's workers ack after the result is durable), results
are ignored (the task stores its own). A task does per item what mljob's collector does per
result: store it in Postgres (`INSERT ... ON CONFLICT DO NOTHING`, a table keyed (job, item)),
then remove the item from the job's Redis pending set; the task that finds the set empty pushes
the time onto the job's "done" list, which the benchmark waits on.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from celery import Celery
from celery.exceptions import SecurityWarning
from celery.signals import worker_ready

# The local stack runs as root on CI and dev machines; the warning says nothing about speed.
warnings.filterwarnings("ignore", category=SecurityWarning)

TABLE = "bench_celery_results"
INSERT = f"""
INSERT INTO {TABLE} (job_uid, item_id, outcome, result, error, attempts, worker, finished_at)
VALUES (%s, %s, 'succeeded', NULL, NULL, %s, %s, now())
ON CONFLICT (job_uid, item_id) DO NOTHING
"""

app = Celery("bench")
app.conf.update(
    broker_url=os.environ.get("MLJOB_REDIS_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("BENCH_CELERY_QUEUE", "bench"),
    task_acks_late=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "16")),
    worker_disable_rate_limits=True,
    worker_enable_remote_control=False,
    worker_redirect_stdouts=False,
    worker_hijack_root_logger=False,
)


def pending_key(job_uid: str) -> str:
    return f"bench:celery:{{{job_uid}}}:pending"


def done_key(job_uid: str) -> str:
    return f"bench:celery:{{{job_uid}}}:done"


_clients: dict[str, Any] = {}


def _redis() -> Any:
    if "redis" not in _clients:
        from redis import Redis

        _clients["redis"] = Redis.from_url(os.environ["MLJOB_REDIS_URL"])
    return _clients["redis"]


def _postgres() -> Any:
    if "postgres" not in _clients:
        import psycopg

        _clients["postgres"] = psycopg.connect(os.environ["MLJOB_POSTGRES_DSN"], autocommit=True)
    return _clients["postgres"]


@app.task(name="bench.process", bind=True)  # type: ignore[untyped-decorator]
def process(self: Any, job_uid: str, item: dict[str, Any], params: dict[str, Any]) -> None:
    """A no-op handler, then the item's bookkeeping: Postgres first, then Redis."""
    item_id = item["id"]
    _postgres().execute(INSERT, (job_uid, item_id, self.request.retries + 1, self.request.hostname))
    pipe = _redis().pipeline(transaction=False)
    pipe.srem(pending_key(job_uid), item_id)
    pipe.scard(pending_key(job_uid))
    _, left = pipe.execute()
    if left == 0:
        _redis().rpush(done_key(job_uid), repr(time.monotonic()))


@worker_ready.connect  # type: ignore[untyped-decorator]
def _say_ready(**_: Any) -> None:
    print("ready", flush=True)  # read by bench.common.Child.expect
