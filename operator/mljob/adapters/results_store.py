"""The Postgres results ledger: one row per (job, item), plus dead letters.

Why this shape:

* Postgres is written before Redis and before the ACK (failure-modes row 1), and the primary key
  ``(job_uid, item_id)`` with ``ON CONFLICT DO NOTHING`` makes redelivery harmless: the first
  recorded outcome stands, and ``upsert`` reports it so Redis can agree with it.
* A batch is one statement (``INSERT ... SELECT FROM unnest(...)``) on an autocommit connection:
  one round trip, atomic, whatever the batch size.
* The ledger is what Redis state is rebuilt from (row 12), hence ``item_outcomes``.
* Results have no foreign key to the job row, so early and late results are kept (row 10).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from mljob import protocol

__all__ = ["RejectedResult", "ResultsStore", "make_pool"]


class RejectedResult(ValueError):
    """Postgres (or the JSON encoder) refused this data: retrying cannot help, unlike an outage."""


def make_pool(
    dsn: str,
    schema: str | None = None,
    min_size: int = 1,
    max_size: int = 10,
    *,
    timeout: float = 10.0,
    connect_timeout: int = 5,
    name: str | None = None,
) -> AsyncConnectionPool:
    """An unopened pool (the caller awaits ``pool.open()``) of autocommit connections.

    Autocommit keeps a single statement to one round trip; multi-statement work uses
    ``conn.transaction()``. ``schema`` becomes each connection's ``search_path`` (deployments and
    tests isolate by schema). ``timeout`` bounds waiting for a connection, so an outage surfaces as
    an error within seconds instead of stalling a loop.
    """

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        if schema is not None:
            await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))

    return AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=timeout,
        name=name,
        configure=configure,
        kwargs={"autocommit": True, "connect_timeout": connect_timeout},
    )


_UPSERT = """
WITH input AS (
    SELECT * FROM unnest(
        %s::text[], %s::text[], %s::text[], %s::text[],
        %s::text[], %s::int[], %s::text[], %s::timestamptz[]
    ) WITH ORDINALITY AS t(job_uid, item_id, outcome, result, error, attempts, worker, finished_at, n)
), inserted AS (
    INSERT INTO mljob_results (job_uid, item_id, outcome, result, error, attempts, worker, finished_at)
    SELECT job_uid, item_id, outcome, result::jsonb, error, attempts, worker, finished_at
    FROM input ORDER BY n
    ON CONFLICT (job_uid, item_id) DO NOTHING
    RETURNING job_uid, item_id, outcome
)
SELECT job_uid, item_id, outcome FROM inserted
UNION ALL
SELECT r.job_uid, r.item_id, r.outcome
FROM mljob_results r JOIN (SELECT DISTINCT job_uid, item_id FROM input) i USING (job_uid, item_id)
"""
# The second SELECT runs on the statement's snapshot, which does not include the rows inserted
# by the CTE: each key appears once, with the outcome that is stored now.

_DEAD_LETTER = "INSERT INTO mljob_dead_letters (source, subject, payload, reason) VALUES (%s, %s, %s, %s)"


def _no_nul(text: str) -> str:
    """Postgres text cannot hold NUL; a dead letter's reason/subject must always be storable."""
    return text.replace("\x00", "\\x00")


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class ResultsStore:
    """Results and dead letters in Postgres, through an (opened) connection pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def upsert(self, results: Sequence[protocol.Result]) -> dict[tuple[str, str], protocol.Outcome]:
        """Store a batch idempotently (first outcome stands); return the stored outcome per key.

        A key stored concurrently by another writer may be absent from the mapping. Raises
        :class:`RejectedResult` when the data itself is refused (e.g. NUL in text, ``\\u0000``
        in JSON), any other error means the database is unavailable.
        """
        if not results:
            return {}
        try:
            columns: tuple[list[Any], ...] = (
                [r.job_uid for r in results],
                [r.item_id for r in results],
                [r.outcome.value for r in results],
                [_json(r.result) for r in results],
                [r.error for r in results],
                [r.attempts for r in results],
                [r.worker for r in results],
                [_utc(r.finished_at) for r in results],
            )
        except (TypeError, ValueError) as err:
            raise RejectedResult(f"result is not storable JSON: {err}") from err
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(_UPSERT, columns)
                rows = await cur.fetchall()
        except (psycopg.DataError, psycopg.IntegrityError) as err:
            raise RejectedResult(f"rejected by Postgres: {err}".splitlines()[0]) from err
        return {(uid, item): protocol.Outcome(outcome) for uid, item, outcome in rows}

    async def dead_letter(self, source: str, subject: str, payload: bytes, reason: str) -> None:
        """Keep an unprocessable message for inspection instead of dropping or redelivering it."""
        async with self.pool.connection() as conn:
            await conn.execute(_DEAD_LETTER, (_no_nul(source), _no_nul(subject), payload, _no_nul(reason)))

    async def item_outcomes(self, uid: str) -> dict[str, str]:
        """item_id -> 'succeeded' | 'failed' for every recorded item (to rebuild Redis state)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT item_id, outcome FROM mljob_results WHERE job_uid = %s", (uid,))
            return {item: outcome for item, outcome in await cur.fetchall()}

    async def count(self, uid: str) -> tuple[int, int]:
        """(recorded items, failed items) of a job."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE outcome = 'failed') FROM mljob_results "
                "WHERE job_uid = %s",
                (uid,),
            )
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)
