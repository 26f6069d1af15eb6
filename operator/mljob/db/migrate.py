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
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Migration",
    "apply_migrations",
    "apply_migrations_async",
    "load_migrations",
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
        for stmt in _prologue(schema):
            cur.execute(stmt)
        cur.execute(_SELECT_APPLIED)
        applied: set[str] = {row[0] for row in cur.fetchall()}
        pending = _pending(migrations, applied)
        for m in pending:
            log.info("applying migration %s", m.version)
            cur.execute(m.sql, prepare=False)
            cur.execute(_RECORD_APPLIED, (m.version,))
    return [m.version for m in pending]


async def apply_migrations_async(conn: psycopg.AsyncConnection[Any], schema: str | None = None) -> list[str]:
    """Async twin of :func:`apply_migrations` (same plan, same locking, same result)."""
    migrations = load_migrations()
    async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        for stmt in _prologue(schema):
            await cur.execute(stmt)
        await cur.execute(_SELECT_APPLIED)
        applied: set[str] = {row[0] for row in await cur.fetchall()}
        pending = _pending(migrations, applied)
        for m in pending:
            log.info("applying migration %s", m.version)
            await cur.execute(m.sql, prepare=False)
            await cur.execute(_RECORD_APPLIED, (m.version,))
    return [m.version for m in pending]
