"""Apply the versioned SQL migrations shipped in ``mljob/db/migrations`` to Postgres.

Why this shape:

* Migrations are plain ``NNNN_name.sql`` files applied in name order and recorded in
  ``mljob_schema_migrations``, so running the operator twice (or two replicas at once) is safe:
  only versions not yet recorded are applied, each exactly once.
* Everything runs in ONE transaction guarded by ``pg_advisory_xact_lock``: concurrent starters
  serialize, and a failing migration leaves nothing half-applied. The lock is taken before any
  DDL (even ``CREATE ... IF NOT EXISTS``), because concurrent ``IF NOT EXISTS`` still races on
  the system catalogs.
* Objects are created in the current ``search_path`` schema (optionally set here), never a
  hard-coded ``public``, so deployments and tests can isolate themselves by schema.
* The files are read with :mod:`importlib.resources` so this works from an installed wheel.
* The sync and async entry points share the statement plan and differ only in how they execute it.
* A migration Postgres refuses for a reason that retrying cannot change (a conflicting object,
  missing rights) raises :class:`MigrationFailed`; a lost connection or a deadlock stays an
  ordinary error. Start-up (:func:`startup_migrate`, :func:`refused`) then stops the process with
  one line instead of retrying forever.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from mljob.transport.natsconn import cause

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Migration",
    "MigrationFailed",
    "apply_migrations",
    "apply_migrations_async",
    "load_migrations",
    "refused",
    "startup_migrate",
]

log = logging.getLogger(__name__)

_MIGRATIONS_ANCHOR = "mljob.db"
_MIGRATIONS_DIR = "migrations"
_FILENAME_RE = re.compile(r"^(?P<num>\d{4})_[A-Za-z0-9_]+\.sql$")


def _advisory_lock_key(name: str) -> int:
    """Derive a stable signed 64-bit advisory-lock key from a name (same in every process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


MIGRATION_LOCK_KEY: int = _advisory_lock_key("mljob-migrations")
"""Database-wide advisory-lock key serializing all migration runs."""

_CREATE_MIGRATIONS_TABLE = sql.SQL(
    "CREATE TABLE IF NOT EXISTS mljob_schema_migrations ("
    " version text PRIMARY KEY,"
    " applied_at timestamptz NOT NULL DEFAULT now())"
)
_SELECT_APPLIED = sql.SQL("SELECT version FROM mljob_schema_migrations")
_RECORD_APPLIED = sql.SQL("INSERT INTO mljob_schema_migrations (version) VALUES (%s)")


@dataclass(frozen=True)
class Migration:
    """One migration file: ``version`` is the file name without ``.sql``."""

    version: str
    sql: bytes


class MigrationFailed(Exception):
    """Postgres refused a migration (or its set-up) for a reason retrying cannot change."""

    def __init__(self, version: str, err: psycopg.Error) -> None:
        super().__init__(f"migration {version} failed ({cause(err)})")
        self.version = version


#: SQLSTATE classes of failures that may pass by themselves: connection exception, transaction
#: rollback (deadlock, serialization), insufficient resources, operator intervention, system error.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
#: SQLSTATEs of a connection Postgres refused, and what to check: the user and password, or the
#: database name.
REFUSED_SQLSTATES = {"28P01": "user and password", "28000": "user and password", "3D000": "database name"}
#: What libpq says when it refuses a connection (it reports no SQLSTATE before one is made).
REFUSED_MESSAGES = (
    (
        re.compile(r'password authentication failed|no pg_hba\.conf entry|role "[^"]*" does not exist'),
        "user and password",
    ),
    (re.compile(r'database "[^"]*" does not exist'), "database name"),
)


def is_transient(err: psycopg.Error) -> bool:
    """Whether a failed statement may succeed when tried again (see TRANSIENT_SQLSTATE_CLASSES)."""
    if err.sqlstate is None:  # no answer from the server: the connection failed
        return isinstance(err, psycopg.OperationalError)
    return err.sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES


@contextmanager
def _migrating(version: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as err:
        if is_transient(err):
            raise
        raise MigrationFailed(version, err) from err


def refused(where: str, schema: str | None = None) -> Callable[[BaseException], str | None]:
    """Postgres start-up failures that retrying cannot heal (a `natsconn.Permanent`): a refused
    connection (password, user, database) or a failed migration; None for everything else."""

    def check(err: BaseException) -> str | None:
        if isinstance(err, MigrationFailed):
            target = f"schema {schema}" if schema else "the schema of the search_path"
            return f"Postgres at {where}: {err}: fix the database ({target}) or MLJOB_POSTGRES_SCHEMA"
        if not isinstance(err, psycopg.OperationalError):
            return None
        what = REFUSED_SQLSTATES.get(err.sqlstate or "") or next(
            (kind for pattern, kind in REFUSED_MESSAGES if pattern.search(str(err))), None
        )
        if what is None:
            return None
        return (
            f"Postgres at {where} refused the connection ({cause(err)}): "
            f"check the {what} in MLJOB_POSTGRES_DSN"
        )

    return check


async def startup_migrate(dsn: str, schema: str | None, connect_timeout: int = 5) -> list[str]:
    """What a process does first with Postgres: one connection of its own, the migrations.

    Its own connection, not a pool's: a pool reports a refused password as a timeout, and
    start-up must tell the two apart (see `refused`).
    """
    async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=connect_timeout) as conn:
        return await apply_migrations_async(conn, schema)


def load_migrations() -> list[Migration]:
    """Return all packaged migrations sorted by version; reject badly named files early.

    A strict ``NNNN_name.sql`` pattern keeps lexical order equal to numeric order, and a unique
    number per file avoids two branches silently adding the "same" step.
    """
    root = resources.files(_MIGRATIONS_ANCHOR).joinpath(_MIGRATIONS_DIR)
    entries = sorted(
        (e for e in root.iterdir() if e.is_file() and e.name.endswith(".sql")), key=lambda e: e.name
    )
    seen: dict[str, str] = {}
    migrations: list[Migration] = []
    for entry in entries:
        match = _FILENAME_RE.match(entry.name)
        if match is None:
            raise ValueError(f"migration file {entry.name!r} does not match NNNN_name.sql")
        num = match["num"]
        if num in seen:
            raise ValueError(f"migrations {seen[num]!r} and {entry.name!r} share number {num}")
        seen[num] = entry.name
        migrations.append(Migration(version=entry.name.removesuffix(".sql"), sql=entry.read_bytes()))
    return migrations


def _prologue(schema: str | None) -> list[sql.SQL | sql.Composed]:
    """Statements run first in the migration transaction: lock, then schema setup, then bookkeeping."""
    stmts: list[sql.SQL | sql.Composed] = [
        sql.SQL("SELECT pg_advisory_xact_lock({})").format(sql.Literal(MIGRATION_LOCK_KEY))
    ]
    if schema is not None:
        ident = sql.Identifier(schema)
        stmts.append(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        # Session-level SET (not LOCAL): the caller's connection keeps using the schema after commit.
        stmts.append(sql.SQL("SET search_path TO {}").format(ident))
    stmts.append(_CREATE_MIGRATIONS_TABLE)
    return stmts


def _pending(migrations: list[Migration], applied: set[str]) -> list[Migration]:
    return [m for m in migrations if m.version not in applied]


def apply_migrations(conn: psycopg.Connection[Any], schema: str | None = None) -> list[str]:
    """Apply not-yet-recorded migrations in one locked transaction; return the versions applied.

    If ``schema`` is given it is created if missing and made the connection's ``search_path``
    (this persists on the connection). If the caller already has a transaction open, this runs in
    a savepoint and nothing (including the advisory lock) is released until the caller commits.
    """
    migrations = load_migrations()
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        with _migrating("set-up"):
            for stmt in _prologue(schema):
                cur.execute(stmt)
            cur.execute(_SELECT_APPLIED)
        applied: set[str] = {row[0] for row in cur.fetchall()}
        pending = _pending(migrations, applied)
        for m in pending:
            log.info("applying migration %s", m.version)
            with _migrating(m.version):
                cur.execute(m.sql, prepare=False)
                cur.execute(_RECORD_APPLIED, (m.version,))
    return [m.version for m in pending]


async def apply_migrations_async(conn: psycopg.AsyncConnection[Any], schema: str | None = None) -> list[str]:
    """Async twin of :func:`apply_migrations` (same plan, same locking, same result)."""
    migrations = load_migrations()
    async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        with _migrating("set-up"):
            for stmt in _prologue(schema):
                await cur.execute(stmt)
            await cur.execute(_SELECT_APPLIED)
        applied: set[str] = {row[0] for row in await cur.fetchall()}
        pending = _pending(migrations, applied)
        for m in pending:
            log.info("applying migration %s", m.version)
            with _migrating(m.version):
                await cur.execute(m.sql, prepare=False)
                await cur.execute(_RECORD_APPLIED, (m.version,))
    return [m.version for m in pending]
