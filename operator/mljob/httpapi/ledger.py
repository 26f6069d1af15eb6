"""The API's reads of the Postgres ledger: a job's row and counts, its items a page at a time, and
the export of its results. Every query is by the job's UID, never its name: a deleted and
re-created MLJob is another job, whose rows these never return.

The reads go through the stores' own helper, `results_store.on_writable` (the pool's
connect-and-retry across a failover), except the export: it streams from a server-side cursor in
one transaction, which cannot be retried once rows were sent. Paging is keyset paging on
`item_id` (`WHERE item_id > <cursor> ORDER BY item_id LIMIT n`): each page is one range read of
the tables' primary keys `(job_uid, item_id)`, however deep into the job it is, and an item
recorded while a client pages is neither skipped nor returned twice.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from mljob.adapters.results_store import on_writable
from mljob.httpapi.disagree import LedgerView
from mljob.httpapi.params import MAX_BUCKETS, ExportFormat, ItemsQuery, bucket_width, encode_cursor
from mljob.ops.metrics import DECIDED_REASONS, HANDLER_FAILED, failure_reason

#: The `reason` values of failed items (ops.metrics' rule: the prefix of an error the operator
#: or the collector decided, else HandlerFailed): what `?reason=` accepts.
REASONS = frozenset(DECIDED_REASONS | {HANDLER_FAILED})
#: Rows per round trip of the export's server-side cursor: its memory, whatever the job's size.
EXPORT_BATCH = 2000
EXPORT_COLUMNS = ("id", "outcome", "reason", "error", "attempts", "worker", "finished", "result")

# The reason of a failed result, in SQL, as `metrics.failure_reason` computes it in Python.
_PREFIX = "btrim(split_part(coalesce(error, ''), ':', 1))"
_REASON = f"CASE WHEN {_PREFIX} = ANY(%(decided)s) THEN {_PREFIX} ELSE %(handler)s END"

_JOB_ROW = """
SELECT phase, reason, message, total, dispatched, processed, failed, created_at, start_time,
       completion_time, last_activity_time
FROM mljob_jobs WHERE uid = %(uid)s
"""
_REGISTERED = "SELECT count(*) FROM mljob_items WHERE job_uid = %(uid)s"
_OUTCOMES = f"""
SELECT outcome, CASE WHEN outcome = 'failed' THEN {_REASON} END, count(*)
FROM mljob_results WHERE job_uid = %(uid)s GROUP BY 1, 2
"""
_SPAN = """
SELECT coalesce(start_time, created_at), coalesce(completion_time, now()), completion_time IS NOT NULL
FROM mljob_jobs WHERE uid = %(uid)s
"""
# Results per bucket of `recorded_at` (Postgres' clock: the workers' clocks may differ), counted
# in the database: one pass over the job's rows, at most 2 x (MAX_BUCKETS + 1) rows back.
_THROUGHPUT = """
SELECT greatest(floor(extract(epoch FROM recorded_at - %(t0)s) / %(width)s), 0)::bigint AS n,
       outcome, count(*)
FROM mljob_results
WHERE job_uid = %(uid)s AND recorded_at < %(t0)s + make_interval(secs => %(window)s)
GROUP BY 1, 2 ORDER BY 1
"""
_EXPORT = """
SELECT item_id, outcome, error, attempts, worker, finished_at, result::text
FROM mljob_results WHERE job_uid = %s ORDER BY item_id
"""


def rfc3339(moment: datetime | None) -> str | None:
    """A time as Kubernetes writes them (UTC, `Z`), or None."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def job_part(pool: AsyncConnectionPool, uid: str) -> tuple[dict[str, Any], LedgerView]:
    """The summary's Postgres part, and what `disagree` compares of it: the job row (None: the
    ledger has never seen the job), its registered items, its results by outcome and its
    failed items by reason. Three statements on one connection."""

    async def read(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, int, list[tuple[Any, ...]]]:
        params = {"uid": uid, "decided": sorted(DECIDED_REASONS), "handler": HANDLER_FAILED}
        row = await (await conn.execute(_JOB_ROW, params)).fetchone()
        registered = await (await conn.execute(_REGISTERED, params)).fetchone()
        outcomes = await (await conn.execute(_OUTCOMES, params)).fetchall()
        return row, int(registered[0]) if registered else 0, list(outcomes)

    row, registered, outcomes = await on_writable(pool, read)
    succeeded = sum(int(n) for outcome, _, n in outcomes if outcome == "succeeded")
    by_reason = {str(reason): int(n) for outcome, reason, n in outcomes if outcome == "failed"}
    failed = sum(by_reason.values())
    job = None
    if row is not None:
        phase, reason, message, total, dispatched, processed, row_failed, created, start, done, active = row
        job = {
            "phase": phase,
            "reason": reason,
            "message": message,
            "total": total,
            "dispatched": dispatched,
            "processed": processed,
            "failed": row_failed,
            "created": rfc3339(created),
            "startTime": rfc3339(start),
            "completionTime": rfc3339(done),
            "lastActivityTime": rfc3339(active),
        }
    part = {
        "job": job,
        "items": registered,
        "outcomes": {
            "succeeded": succeeded,
            "failed": failed,
            "pending": max(registered - succeeded - failed, 0),
        },
        "failedByReason": dict(sorted(by_reason.items())),
    }
    view = LedgerView(
        phase=row[0] if row is not None else None, registered=registered, succeeded=succeeded, failed=failed
    )
    return part, view


async def throughput(pool: AsyncConnectionPool, uid: str, asked: int | None) -> dict[str, Any]:
    """Results recorded per bucket from the job's start to its end (or now): `{"uid", "bucket"
    (seconds), "start", "end", "finished" (the job has its verdict), "points": [{"start",
    "succeeded", "failed"}]}`, every bucket of the span listed (zeros too), at most MAX_BUCKETS + 1
    of them; a result recorded later than that (after a verdict) is left out. No job row: no
    points. The width is `asked` unless that makes more than MAX_BUCKETS buckets
    (`params.bucket_width`): the answer's `bucket` is the width used."""

    async def read(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, list[tuple[Any, ...]], int]:
        span = await (await conn.execute(_SPAN, {"uid": uid})).fetchone()
        if span is None:
            return None, [], 0
        t0, t1, _ = span
        width = bucket_width((t1 - t0).total_seconds(), asked)
        args = {"uid": uid, "t0": t0, "width": width, "window": width * (MAX_BUCKETS + 1)}
        return span, list(await (await conn.execute(_THROUGHPUT, args)).fetchall()), width

    span, rows, width = await on_writable(pool, read)
    if span is None:
        return {"uid": uid, "bucket": None, "start": None, "end": None, "finished": False, "points": []}
    t0, t1, finished = span
    last = min(
        max(int((t1 - t0).total_seconds() // width), max((int(n) for n, _, _ in rows), default=0)),
        MAX_BUCKETS,
    )
    counts = [{"succeeded": 0, "failed": 0} for _ in range(last + 1)]
    for n, outcome, count in rows:
        if int(n) <= last and outcome in ("succeeded", "failed"):
            counts[int(n)][outcome] += int(count)
    return {
        "uid": uid,
        "bucket": width,
        "start": rfc3339(t0),
        "end": rfc3339(t1),
        "finished": bool(finished),
        "points": [
            {"start": rfc3339(t0 + timedelta(seconds=width * n)), **count} for n, count in enumerate(counts)
        ],
    }


def _items_sql(query: ItemsQuery) -> sql.Composed:
    """The page's statement: every item (with its result, if any), pending ones (no result
    row), or results of one outcome (and reason); all keyset-paged on item_id."""

    def after(column: str) -> sql.Composable:
        return sql.SQL(f"AND {column} > %(after)s") if query.after is not None else sql.SQL("")

    if query.outcome is None:
        return sql.SQL(
            "SELECT i.item_id, r.outcome, r.error, r.attempts, r.worker, r.finished_at "
            "FROM mljob_items i LEFT JOIN mljob_results r "
            "ON r.job_uid = i.job_uid AND r.item_id = i.item_id "
            "WHERE i.job_uid = %(uid)s {after} ORDER BY i.item_id LIMIT %(limit)s"
        ).format(after=after("i.item_id"))
    if query.outcome == "pending":
        return sql.SQL(
            "SELECT i.item_id, NULL, NULL, NULL, NULL, NULL FROM mljob_items i "
            "WHERE i.job_uid = %(uid)s {after} AND NOT EXISTS ("
            "SELECT 1 FROM mljob_results r WHERE r.job_uid = i.job_uid AND r.item_id = i.item_id) "
            "ORDER BY i.item_id LIMIT %(limit)s"
        ).format(after=after("i.item_id"))
    reason = sql.SQL(f"AND {_REASON} = %(reason)s") if query.reason is not None else sql.SQL("")
    return sql.SQL(
        "SELECT item_id, outcome, error, attempts, worker, finished_at FROM mljob_results "
        "WHERE job_uid = %(uid)s AND outcome = %(outcome)s {after} {reason} "
        "ORDER BY item_id LIMIT %(limit)s"
    ).format(after=after("item_id"), reason=reason)


def item_entry(row: Sequence[Any]) -> dict[str, Any]:
    """One item of a page: its outcome (pending when it has no result yet) and the result's facts."""
    item_id, outcome, error, attempts, worker, finished = row
    return {
        "id": item_id,
        "outcome": outcome or "pending",
        "reason": failure_reason(error) if outcome == "failed" else None,
        "error": error,
        "attempts": attempts,
        "worker": worker,
        "finished": rfc3339(finished),
    }


async def items_page(pool: AsyncConnectionPool, uid: str, query: ItemsQuery) -> dict[str, Any]:
    """`{"items": [...], "next": cursor or None}`: up to `limit` items after the cursor, by id;
    `next` is None on the last page (one row more than asked for is read to know)."""
    params: dict[str, Any] = {
        "uid": uid,
        "after": query.after,
        "limit": query.limit + 1,
        "outcome": query.outcome,
        "reason": query.reason,
        "decided": sorted(DECIDED_REASONS),
        "handler": HANDLER_FAILED,
    }
    statement = _items_sql(query)

    async def read(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        return list(await (await conn.execute(statement, params)).fetchall())

    rows = await on_writable(pool, read)
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    return {
        "uid": uid,
        "items": [item_entry(row) for row in rows],
        "next": encode_cursor(rows[-1][0]) if more and rows else None,
    }


def _export_row(row: Sequence[Any]) -> tuple[Any, ...]:
    item_id, outcome, error, attempts, worker, finished, result = row
    reason = failure_reason(error) if outcome == "failed" else None
    return (item_id, outcome, reason, error, attempts, worker, rfc3339(finished), result)


def encode_rows(rows: Sequence[Sequence[Any]], fmt: ExportFormat) -> bytes:
    """One batch of the export: JSON lines (the result as the JSON it was stored as) or CSV rows
    (the result as JSON text)."""
    if fmt == "jsonl":
        lines = []
        for row in rows:
            *fields, result = _export_row(row)
            head = json.dumps(dict(zip(EXPORT_COLUMNS[:-1], fields, strict=True)), ensure_ascii=False)
            lines.append(f'{head[:-1]}, "result": {result if result is not None else "null"}}}\n')
        return "".join(lines).encode()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerows(_export_row(row) for row in rows)
    return out.getvalue().encode()


def csv_header() -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(EXPORT_COLUMNS)
    return out.getvalue().encode()


async def export_rows(
    conn: psycopg.AsyncConnection[Any], uid: str
) -> AsyncGenerator[list[tuple[Any, ...]], None]:
    """The job's results in id order, `EXPORT_BATCH` rows at a time, from a server-side cursor:
    the whole job is never in memory (the caller holds `conn` and its transaction throughout)."""
    async with conn.transaction(), conn.cursor(name="mljob_export") as cursor:
        await cursor.execute(_EXPORT, (uid,))
        while True:
            rows = await cursor.fetchmany(EXPORT_BATCH)
            if not rows:
                return
            yield list(rows)
