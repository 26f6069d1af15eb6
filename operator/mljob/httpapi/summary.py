"""A job's summary as every store sees it, and the namespace listing's entry of a job.

The summary reads the three stores at once, each within `STORE_TIMEOUT_SECONDS`: the Postgres
ledger (`ledger.job_part`), the job's Redis state (`JobState.counts`) and its NATS consumer
(its `num_pending`, `num_ack_pending`, `num_redelivered`). A store that cannot be read gives
its part as null and a line in `errors`; the others are still answered (never a 500 for one
store down). `disagreements` says in plain words where the stores that answered differ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from psycopg_pool import AsyncConnectionPool

from mljob import protocol
from mljob.adapters.outage import one_line
from mljob.adapters.redis_state import JobState
from mljob.httpapi import ledger
from mljob.httpapi.disagree import KubeView, NatsView, RedisView, disagreements

T = TypeVar("T")

#: How long one store may take to answer its part of a summary.
STORE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Stores:
    """What the reads need, opened by the server at start-up."""

    pool: AsyncConnectionPool
    state: JobState
    js: JetStreamContext


def identity(body: Mapping[str, Any]) -> tuple[str, str, str]:
    """(namespace, name, uid) of an MLJob."""
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or ""), str(meta.get("uid") or "")


def job_entry(body: Mapping[str, Any]) -> dict[str, Any]:
    """One MLJob of the namespace listing, from the MLJob alone (as `kubectl get mljobs` shows)."""
    namespace, name, uid = identity(body)
    status = body.get("status") or {}
    return {
        "namespace": namespace,
        "name": name,
        "uid": uid,
        "pipeline": (body.get("spec") or {}).get("pipeline"),
        "phase": status.get("phase"),
        "counts": {
            "total": status.get("total"),
            "processed": status.get("processed"),
            "failed": status.get("failed"),
        },
        "progress": status.get("progress"),
        "created": (body.get("metadata") or {}).get("creationTimestamp"),
    }


async def _bounded(what: str, read: Awaitable[T]) -> tuple[T | None, str | None]:
    """(value, None), or (None, one line naming the store and the cause)."""
    try:
        return await asyncio.wait_for(read, STORE_TIMEOUT_SECONDS), None
    except TimeoutError:
        return None, f"{what}: no answer within {STORE_TIMEOUT_SECONDS:g}s"
    except Exception as err:
        return None, f"{what}: {one_line(err)}"


async def redis_part(state: JobState, uid: str) -> tuple[dict[str, Any], RedisView]:
    counts = await state.counts(uid)
    if counts is None:
        return {"present": False}, RedisView(present=False)
    active = counts.last_activity
    part = {
        "present": True,
        "total": counts.total,
        "pending": counts.pending,
        "processed": counts.processed,
        "failed": counts.failed,
        "lastActivity": ledger.rfc3339(datetime.fromtimestamp(active, UTC)) if active is not None else None,
    }
    return part, RedisView(present=True, total=counts.total, pending=counts.pending, failed=counts.failed)


async def nats_part(
    js: JetStreamContext, pipeline: str, uid: str, generation: int = 0
) -> tuple[dict[str, Any], NatsView]:
    """The job's current consumer (`status.consumerGeneration`: a replaced one has a new name)."""
    stream, consumer = protocol.task_stream(pipeline), protocol.task_consumer(uid, generation)
    part: dict[str, Any] = {"stream": stream, "consumer": consumer}
    try:
        info = await js.consumer_info(stream, consumer, timeout=STORE_TIMEOUT_SECONDS)
    except NotFoundError:  # the consumer, or the whole stream
        return {**part, "present": False}, NatsView(consumer=False)
    part.update(
        present=True,
        numPending=int(info.num_pending or 0),
        numAckPending=int(info.num_ack_pending or 0),
        numRedelivered=int(info.num_redelivered or 0),
    )
    return part, NatsView(consumer=True)


async def summary(stores: Stores, body: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of the MLJob `body` (read by the caller): its status, and each store's part."""
    namespace, name, uid = identity(body)
    status = dict(body.get("status") or {})
    pipeline = str((body.get("spec") or {}).get("pipeline") or "")
    (pg, pg_error), (rd, rd_error), (nt, nt_error) = await asyncio.gather(
        _bounded("Postgres", ledger.job_part(stores.pool, uid)),
        _bounded("Redis", redis_part(stores.state, uid)),
        _bounded("NATS", nats_part(stores.js, pipeline, uid, int(status.get("consumerGeneration") or 0))),
    )
    errors = {
        key: error
        for key, error in (("postgres", pg_error), ("redis", rd_error), ("nats", nt_error))
        if error
    }
    kube = KubeView(
        phase=status.get("phase"),
        total=status.get("total"),
        processed=status.get("processed"),
        failed=status.get("failed"),
    )
    return {
        "namespace": namespace,
        "name": name,
        "uid": uid,
        "pipeline": pipeline,
        "phase": status.get("phase"),
        "created": (body.get("metadata") or {}).get("creationTimestamp"),
        "status": status,
        "postgres": pg[0] if pg else None,
        "redis": rd[0] if rd else None,
        "nats": nt[0] if nt else None,
        "errors": errors,
        "disagreements": disagreements(
            kube, pg[1] if pg else None, rd[1] if rd else None, nt[1] if nt else None
        ),
    }
