"""The Postgres results ledger: one row per (job, item), plus dead letters.

Why this shape:

* Postgres is written before Redis and before the ACK (failure-modes row 1), and the primary key
  ``(job_uid, item_id)`` with ``ON CONFLICT DO NOTHING`` makes redelivery harmless: the first
  recorded outcome stands, and ``upsert`` reports it so Redis can agree with it.
* A batch is one statement (``INSERT ... SELECT FROM unnest(...)``) on an autocommit connection:
  one round trip, atomic, whatever the batch size.
* The ledger is what Redis state is rebuilt from (row 12), hence ``item_outcomes``.
* Results have no foreign key to the job row, so late results are kept (row 10).
* ``mljob_items`` is the snapshot of each job's items taken at dispatch (``register_items``,
  before the first task is published: row 9): the ids, and each item's free fields, which
  re-dispatch builds its tasks from (the item source may have changed since). ``upsert``
  stores only results of registered items, checked in the same statement that stores them, so
  a result for a job never dispatched or for an id that is not an item of its job can never
  count, and the caller learns which were refused. The snapshot outlives cleanup, so late
  results are still recognised.
* Failover (a primary and standbys behind a multi-host DSN): the pool hands out only
  connections to a writable server (``writable``), and every store call goes through
  ``on_writable``, which drops a connection that failed over and runs the call again on the
  new primary within ``FAILOVER_RETRY_SECONDS``. The ledger stays exact across it: a batch that
  committed before its connection broke is, run again, a redelivery (first outcome stands).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from pydantic_core import to_json

from mljob import protocol
from mljob.core import items as item_rules
from mljob.db.migrate import is_transient

__all__ = [
    "FAILOVER_RETRY_SECONDS",
    "RECONNECT_SECONDS",
    "ReadOnlyServer",
    "RejectedResult",
    "ResultsStore",
    "UpsertResult",
    "chunks",
    "failover_seconds",
    "fetch_all",
    "make_pool",
    "on_writable",
    "writable",
]

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""(job uid, item id)."""

T = TypeVar("T")


class RejectedResult(ValueError):
    """Postgres (or the JSON encoder) refused this data: retrying cannot help, unlike an outage."""


@dataclass
class UpsertResult:
    """What ``upsert`` did with a batch, per (job uid, item id).

    ``stored``: the outcome the ledger holds now (the first one recorded stands), for every
    accepted key. ``unknown_job``: keys of a job with no registered items at all (never
    dispatched, or forged). ``not_an_item``: keys of a known job whose id is not one of its items.
    """

    stored: dict[Key, protocol.Outcome] = field(default_factory=dict)
    unknown_job: set[Key] = field(default_factory=set)
    not_an_item: set[Key] = field(default_factory=set)

    def refusal(self, key: Key) -> str | None:
        """Why ``key`` was refused (a dead-letter reason), or None when it was accepted."""
        uid, item_id = key
        if key in self.unknown_job:
            return f"unknown job: no items are registered for job {uid}"
        if key in self.not_an_item:
            return f"not an item: {item_id!r} is not an item of job {uid}"
        return None

    def update(self, other: UpsertResult) -> None:
        self.stored.update(other.stored)
        self.unknown_job |= other.unknown_job
        self.not_an_item |= other.not_an_item


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
    an error within seconds instead of stalling a loop. Each checkout is checked to reach a
    writable server (`writable`): after a failover, or a primary demoted in place, the pool
    connects again to whichever host of a multi-host DSN is the primary now. The pool's own
    reconnection gives up after `RECONNECT_SECONDS`, so a connection is made afresh on demand.
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
        check=writable,
        reconnect_timeout=RECONNECT_SECONDS,
        kwargs={"autocommit": True, "connect_timeout": connect_timeout},
    )


#: Seconds the pool's background reconnection keeps trying (psycopg_pool backs off 1, 2, 4, 8 s
#: ...: after a promotion at 9 s its next try would be at 15 s); then a waiting caller makes the
#: pool grow with a fresh attempt, so a promoted standby is found within a second or two.
RECONNECT_SECONDS = 3.0
#: Seconds a store call keeps trying across a Postgres failover before the error reaches its
#: caller, when the DSN names several hosts (a primary and its standbys): a promotion takes
#: about ten (Patroni's leader key TTL, devstack/postgres_ha.py), and the collector must be done
#: with a batch well within its results' ack wait (30 s). With one host there is no standby to
#: wait for: an outage surfaces at once, as before (the callers' own retries take it from there).
FAILOVER_RETRY_SECONDS = 20.0
_RETRY_INITIAL_SECONDS = 0.1
_RETRY_MAX_SECONDS = 1.0


class ReadOnlyServer(psycopg.OperationalError):
    """The pool's connection is to a server that takes no writes (a standby, a demoted primary)."""


async def writable(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's check on checkout: the connection answers and its server takes writes.

    One round trip (`SHOW transaction_read_only`, which a standby, a demoted primary and
    `default_transaction_read_only=on` all answer with `on`), a fraction of a millisecond on
    loopback. A connection that fails it is closed, so the pool discards it and connects anew:
    the DSN's `target_session_attrs=read-write` then finds the primary, whichever host it is.
    """
    try:
        cur = await conn.execute("SHOW transaction_read_only")
        row = await cur.fetchone()
    except BaseException:
        await conn.close()
        raise
    if row is None or row[0] != "off":
        await conn.close()
        raise ReadOnlyServer(f"{conn.info.host}:{conn.info.port} is read-only (a standby, or demoted)")


def _failed_over(err: psycopg.Error) -> bool:
    """Errors a failover causes and a new connection heals: the server refused the write as
    read-only (SQLSTATE 25006), the connection broke or none could be had (no SQLSTATE), the
    server is shutting down (57P01), and the other transient ones of `migrate.is_transient`."""
    return isinstance(err, psycopg.errors.ReadOnlySqlTransaction) or is_transient(err)


def _not_sent(err: psycopg.Error, started: bool) -> bool:
    """Whether `err` proves nothing was written: no connection was had, or the server refused
    the statement as read-only (in autocommit or a transaction, nothing of it committed)."""
    return not started or isinstance(err, (psycopg.errors.ReadOnlySqlTransaction, PoolTimeout))


@functools.lru_cache(maxsize=16)
def failover_seconds(conninfo: str) -> float:
    """The retry budget of a pool's DSN: FAILOVER_RETRY_SECONDS for several hosts, else 0."""
    try:
        hosts = str(conninfo_to_dict(conninfo).get("host") or "")
    except psycopg.ProgrammingError:
        return 0.0
    return FAILOVER_RETRY_SECONDS if "," in hosts else 0.0


async def on_writable(
    pool: AsyncConnectionPool,
    work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    *,
    idempotent: bool = True,
    budget: float | None = None,
) -> T:
    """`work(conn)` on a connection to a writable server, tried again across a failover.

    The one connect-and-retry of the Postgres stores. A connection that raised a failover error
    (`_failed_over`) is closed, so it never goes back into the pool, and the pool is drained of
    its idle connections (they are to the same server); then `work` runs again on a new
    connection, backing off, until `budget` seconds have passed (`failover_seconds` of the pool's
    DSN when None): its last error is raised. A pooled connection found broken is replaced once
    even without a budget. The wait for a connection is cut to what is left of the budget (the
    pool's own timeout without one), so the whole call is bounded.
    `idempotent=False` (a plain INSERT) is tried again only when nothing can have been written
    (`_not_sent`): a connection lost mid-statement may have committed it. Any other error is
    raised at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (failover_seconds(pool.conninfo) if budget is None else budget)
    delay = _RETRY_INITIAL_SECONDS
    replaced = False
    while True:
        started = False
        try:
            left = deadline - loop.time()
            async with pool.connection(
                timeout=pool.timeout if left <= 0 else min(pool.timeout, left)
            ) as conn:
                started = True
                try:
                    return await work(conn)
                except psycopg.Error as err:
                    if _failed_over(err) and not conn.closed:
                        await conn.close()  # the pool discards a closed connection
                    raise
        except psycopg.Error as err:
            if not _failed_over(err) or not (idempotent or _not_sent(err, started)):
                raise
            if loop.time() + delay > deadline and (replaced or not started):
                raise
            if started:
                replaced = True
                await pool.drain()
            log.debug("Postgres write failed over (%s); trying again in %.1fs", type(err).__name__, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, _RETRY_MAX_SECONDS)


_UPSERT = """
WITH input AS (
    SELECT t.*,
        EXISTS (SELECT 1 FROM mljob_items m WHERE m.job_uid = t.job_uid AND m.item_id = t.item_id) AS is_item,
        EXISTS (SELECT 1 FROM mljob_items m WHERE m.job_uid = t.job_uid) AS job_known
    FROM unnest(
        %s::text[], %s::text[], %s::text[], %s::text[],
        %s::text[], %s::int[], %s::text[], %s::timestamptz[]
    ) WITH ORDINALITY AS t(job_uid, item_id, outcome, result, error, attempts, worker, finished_at, n)
), inserted AS (
    INSERT INTO mljob_results (job_uid, item_id, outcome, result, error, attempts, worker, finished_at)
    SELECT job_uid, item_id, outcome, result::jsonb, error, attempts, worker, finished_at
    FROM input WHERE is_item ORDER BY n
    ON CONFLICT (job_uid, item_id) DO NOTHING
    RETURNING job_uid, item_id, outcome
)
SELECT 'stored', job_uid, item_id, outcome FROM inserted
UNION ALL
SELECT 'stored', r.job_uid, r.item_id, r.outcome
FROM mljob_results r
JOIN (SELECT DISTINCT job_uid, item_id FROM input WHERE is_item) i USING (job_uid, item_id)
UNION ALL
SELECT DISTINCT CASE WHEN job_known THEN 'not_an_item' ELSE 'unknown_job' END, job_uid, item_id, NULL
FROM input WHERE NOT is_item
"""
# One statement, so the membership check and the insert see the same snapshot: a result is
# stored if and only if its key is a registered item. The second SELECT runs on that snapshot,
# which does not include the rows inserted by the CTE: each key appears once, with the outcome
# stored now. A key inserted by a concurrent writer after the snapshot is missing from both;
# ``upsert`` reads those back once the statement is done (ON CONFLICT waited for that writer).

_STORED = """
SELECT r.job_uid, r.item_id, r.outcome FROM mljob_results r
JOIN unnest(%s::text[], %s::text[]) AS k(job_uid, item_id) USING (job_uid, item_id)
"""

_REGISTER = """
INSERT INTO mljob_items (job_uid, item_id, fields)
SELECT %s, item_id, fields::json FROM unnest(%s::text[], %s::text[]) AS t(item_id, fields)
ON CONFLICT DO NOTHING
"""
#: Ids (or results) per statement, for registering items and for failing them: large enough to
#: be a few round trips for 100,000 items, small enough to keep each statement's parameters (and
#: the server's memory for them) to a few MB, and a retry to one chunk's worth.
REGISTER_CHUNK = 50_000


def chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    """`values` in slices of `REGISTER_CHUNK`: one statement each, however many items a job has."""
    for start in range(0, len(values), REGISTER_CHUNK):
        yield values[start : start + REGISTER_CHUNK]


_UNRESOLVED_RECORDS = """
SELECT i.item_id, i.fields FROM mljob_items i
WHERE i.job_uid = %s
  AND NOT EXISTS (SELECT 1 FROM mljob_results r WHERE r.job_uid = i.job_uid AND r.item_id = i.item_id)
ORDER BY i.item_id
"""

_UNRESOLVED = """
SELECT i.item_id FROM mljob_items i
WHERE i.job_uid = %s
  AND NOT EXISTS (SELECT 1 FROM mljob_results r WHERE r.job_uid = i.job_uid AND r.item_id = i.item_id)
ORDER BY i.item_id
"""

_DEAD_LETTER = "INSERT INTO mljob_dead_letters (source, subject, payload, reason) VALUES (%s, %s, %s, %s)"
_DEAD_LETTERS = """
INSERT INTO mljob_dead_letters (source, subject, payload, reason)
SELECT %s, subject, payload, reason
FROM unnest(%s::text[], %s::bytea[], %s::text[]) WITH ORDINALITY AS t(subject, payload, reason, n)
ORDER BY n
"""


def _no_nul(text: str) -> str:
    """Postgres text cannot hold NUL; a dead letter's reason/subject must always be storable."""
    return text.replace("\x00", "\\x00")


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _fields_json(item: Mapping[str, Any]) -> str | None:
    """An item's free fields as JSON text (None: only an id), encoded as its task body encodes
    them (pydantic-core, NUL escaped), NaN and infinities as null: Postgres json has no NaN."""
    fields = item_rules.fields_of(item)
    return None if fields is None else to_json(fields, inf_nan_mode="null").decode()


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class ResultsStore:
    """Results and dead letters in Postgres, through an (opened) connection pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def register_items(self, uid: str, items: Sequence[str] | Sequence[Mapping[str, Any]]) -> None:
        """Record the job's items, ids or whole items; results are accepted only for these ids
        (idempotent), and an item's free fields are kept beside its id, for re-dispatch.

        Call it with every item before the job's first task is published, and again on a
        resumed dispatch: ids already registered are skipped (their fields as first recorded).
        All or nothing (one transaction). Raises :class:`ValueError` for an id Postgres cannot
        store (NUL).
        """
        if not items:
            return
        ids = [item if isinstance(item, str) else str(item["id"]) for item in items]
        fields = [None if isinstance(item, str) else _fields_json(item) for item in items]

        async def register(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                for part, part_fields in zip(chunks(ids), chunks(fields), strict=True):
                    await conn.execute(_REGISTER, (uid, part, part_fields))

        try:
            await on_writable(self.pool, register)
        except psycopg.DataError as err:
            raise ValueError(f"item ids of job {uid} are not storable: {err}".splitlines()[0]) from err

    async def registered_count(self, uid: str) -> int:
        """How many items the job has registered (0: a job this ledger has never seen)."""
        row = await self._one("SELECT count(*) FROM mljob_items WHERE job_uid = %s", (uid,))
        return int(row[0]) if row else 0

    async def unresolved_items(self, uid: str) -> list[str]:
        """Registered items of the job with no result row, sorted by id: what is still to do when
        the stream was lost (re-dispatch) or Redis state must be rebuilt."""
        return [item for (item,) in await self._all(_UNRESOLVED, (uid,))]

    async def unresolved_item_records(self, uid: str) -> list[dict[str, Any]]:
        """The registered items without a result row, sorted by id, each as dispatch recorded it
        (id and free fields): the tasks re-dispatch publishes again, whatever the item source
        says now."""
        rows = await self._all(_UNRESOLVED_RECORDS, (uid,))
        return [item_rules.with_fields(item, fields) for item, fields in rows]

    async def upsert(self, results: Sequence[protocol.Result]) -> UpsertResult:
        """Store a batch idempotently (first outcome stands), refusing keys that are not items.

        Returns the stored outcome of every accepted key and the refused keys, split into
        "job never seen" and "not an item of that job". Raises :class:`RejectedResult` when the
        data itself is refused (e.g. NUL in text, ``\\u0000`` in JSON); any other error means the
        database is unavailable. Nothing of the batch is stored when it raises.

        Across a failover the batch is stored again on the new primary (`on_writable`): exact,
        as a redelivery is, since the statement inserts only keys without a row and reports the
        row each key has, so an attempt that committed before its connection broke only turns
        its keys' `stored` outcome into the one already recorded.
        """
        out = UpsertResult()
        if not results:
            return out
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

        async def store(conn: psycopg.AsyncConnection[Any]) -> UpsertResult:
            out = UpsertResult()  # afresh on each attempt
            cur = await conn.execute(_UPSERT, columns)
            for kind, uid, item, outcome in await cur.fetchall():
                if kind == "stored":
                    out.stored[(uid, item)] = protocol.Outcome(outcome)
                elif kind == "unknown_job":
                    out.unknown_job.add((uid, item))
                else:
                    out.not_an_item.add((uid, item))
            missing = {(r.job_uid, r.item_id) for r in results} - out.stored.keys()
            missing -= out.unknown_job | out.not_an_item
            if missing:
                uids, items = zip(*missing, strict=True)
                cur = await conn.execute(_STORED, (list(uids), list(items)))
                for uid, item, outcome in await cur.fetchall():
                    out.stored[(uid, item)] = protocol.Outcome(outcome)
            return out

        try:
            return await on_writable(self.pool, store)
        except (psycopg.DataError, psycopg.IntegrityError) as err:
            raise RejectedResult(f"rejected by Postgres: {err}".splitlines()[0]) from err

    async def dead_letters(self, source: str, letters: Sequence[tuple[str, bytes, str]]) -> None:
        """Keep unprocessable messages ``(subject, payload, reason)`` for inspection, in one
        statement (a flood of refusals costs one round trip per batch, not one per message).
        Not idempotent: tried again after a failover only when nothing was written."""
        if not letters:
            return
        params = (
            _no_nul(source),
            [_no_nul(subject) for subject, _, _ in letters],
            [payload for _, payload, _ in letters],
            [_no_nul(reason) for _, _, reason in letters],
        )
        await self._write(_DEAD_LETTERS, params, idempotent=False)

    async def dead_letter(self, source: str, subject: str, payload: bytes, reason: str) -> None:
        """Keep an unprocessable message for inspection instead of dropping or redelivering it."""
        params = (_no_nul(source), _no_nul(subject), payload, _no_nul(reason))
        await self._write(_DEAD_LETTER, params, idempotent=False)

    async def job_pipelines(self, uids: Sequence[str]) -> dict[str, str]:
        """uid -> pipeline of those jobs the ledger has a row for."""
        rows = await self._all("SELECT uid, pipeline FROM mljob_jobs WHERE uid = ANY(%s)", (list(uids),))
        return {uid: pipeline for uid, pipeline in rows}

    async def item_outcomes(self, uid: str) -> dict[str, str]:
        """item_id -> 'succeeded' | 'failed' for every recorded item (to rebuild Redis state)."""
        rows = await self._all("SELECT item_id, outcome FROM mljob_results WHERE job_uid = %s", (uid,))
        return {item: outcome for item, outcome in rows}

    async def count(self, uid: str) -> tuple[int, int]:
        """(recorded items, failed items) of a job."""
        row = await self._one(
            "SELECT count(*), count(*) FILTER (WHERE outcome = 'failed') FROM mljob_results "
            "WHERE job_uid = %s",
            (uid,),
        )
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # One statement each, through `on_writable`.
    async def _all(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await fetch_all(self.pool, query, params)

    async def _one(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        rows = await fetch_all(self.pool, query, params)
        return rows[0] if rows else None

    async def _write(self, query: str, params: tuple[Any, ...], *, idempotent: bool) -> None:
        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(query, params)

        await on_writable(self.pool, run, idempotent=idempotent)


async def fetch_all(pool: AsyncConnectionPool, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """One statement's rows, through `on_writable` (a read, or an idempotent write)."""

    async def run(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        cur = await conn.execute(query, params)
        return list(await cur.fetchall())

    return await on_writable(pool, run)
