"""Tests for the versioned Postgres schema and its migration runner, against a REAL Postgres.

The DSN comes from ``MLJOB_POSTGRES_DSN``; the tests fail (never skip) when it is unset. Every test
works in its own fresh schema so tests cannot see each other's tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql

from mljob.db.migrate import apply_migrations, apply_migrations_async, load_migrations

OPERATOR_DIR = Path(__file__).resolve().parents[2] / "operator"

EXPECTED_COLUMNS: dict[str, set[str]] = {
    "mljob_jobs": {
        "uid",
        "namespace",
        "name",
        "pipeline",
        "phase",
        "total",
        "dispatched",
        "processed",
        "failed",
        "reason",
        "message",
        "spec",
        "created_at",
        "updated_at",
        "start_time",
        "completion_time",
        "last_activity_time",
    },
    "mljob_results": {
        "job_uid",
        "item_id",
        "outcome",
        "result",
        "error",
        "attempts",
        "worker",
        "finished_at",
        "recorded_at",
    },
    "mljob_transitions": {
        "id",
        "job_uid",
        "from_phase",
        "to_phase",
        "reason",
        "message",
        "actor",
        "at",
    },
    "mljob_dead_letters": {"id", "source", "subject", "payload", "reason", "at"},
    "mljob_items": {"job_uid", "item_id", "fields"},
    "mljob_schema_migrations": {"version", "applied_at"},
}


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    dsn = os.environ.get("MLJOB_POSTGRES_DSN")
    if not dsn:
        pytest.fail(
            "MLJOB_POSTGRES_DSN is not set: these tests need a real Postgres; point it at a database."
        )
    return dsn


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    """A fresh, unique schema name; dropped (with everything in it) afterwards."""
    name = f"t_{uuid.uuid4().hex}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def migrated(pg_dsn: str, schema: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection whose search_path is a freshly migrated schema."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_migrations(conn, schema)
        yield conn


def _all_versions() -> list[str]:
    return [m.version for m in load_migrations()]


def _columns(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> dict[str, set[str]]:
    rows = conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s",
        (schema,),
    ).fetchall()
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(str(table), set()).add(str(column))
    return out


def test_packaged_migrations_found() -> None:
    versions = _all_versions()
    assert versions, "no migrations found via importlib.resources"
    assert versions[0] == "0001_initial"
    assert versions == sorted(versions)


def test_apply_twice_is_idempotent_and_creates_tables(pg_dsn: str, schema: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        first = apply_migrations(conn, schema)
        second = apply_migrations(conn, schema)
        assert first == _all_versions()
        assert second == []
        recorded = [r[0] for r in conn.execute("SELECT version FROM mljob_schema_migrations ORDER BY 1")]
        assert recorded == _all_versions()

    # A brand-new connection sees the committed schema (i.e. the migration transaction committed).
    with psycopg.connect(pg_dsn) as conn:
        assert _columns(conn, schema) == EXPECTED_COLUMNS
        assert apply_migrations(conn, schema) == []


async def test_apply_async_twin(pg_dsn: str, schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn) as aconn:
        assert await apply_migrations_async(aconn, schema) == _all_versions()
        assert await apply_migrations_async(aconn, schema) == []
    with psycopg.connect(pg_dsn) as conn:
        assert _columns(conn, schema) == EXPECTED_COLUMNS
        # Sync and async runners share the bookkeeping: the sync one sees nothing left to do.
        assert apply_migrations(conn, schema) == []


_CHILD = """
import json, sys
import psycopg
from mljob.db.migrate import apply_migrations
dsn, schema = sys.argv[1], sys.argv[2]
with psycopg.connect(dsn) as conn:
    conn.execute("SELECT 1")
    conn.commit()
    print("ready", flush=True)
    sys.stdin.readline()  # barrier: parent releases every process at the same moment
    print(json.dumps(apply_migrations(conn, schema)), flush=True)
"""


def test_concurrent_processes_apply_each_version_once(pg_dsn: str, schema: str) -> None:
    n = 4
    pythonpath = [str(OPERATOR_DIR), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, pythonpath))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, pg_dsn, schema],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                p.kill()
                pytest.fail(f"child did not get ready: {line!r}\n{p.communicate()[1]}")
        for p in procs:  # release all (already connected) children together
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    applied: list[list[str]] = []
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, f"migration process failed:\n{err}"
        applied.append(json.loads(out.strip().splitlines()[-1]))

    counts = Counter(v for lst in applied for v in lst)
    assert counts == Counter(_all_versions()), f"each version must be applied exactly once: {applied}"

    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            sql.SQL("SELECT version, count(*) FROM {}.mljob_schema_migrations GROUP BY 1 ORDER BY 1").format(
                sql.Identifier(schema)
            )
        ).fetchall()
        assert rows == [(v, 1) for v in _all_versions()]
        assert _columns(conn, schema) == EXPECTED_COLUMNS


def test_phase_check_rejects_unknown_phase(migrated: psycopg.Connection[tuple[object, ...]]) -> None:
    insert = "INSERT INTO mljob_jobs (uid, namespace, name, pipeline, phase) VALUES (%s, 'ns', 'j', 'p', %s)"
    migrated.execute(insert, ("uid-ok", "Pending"))
    with pytest.raises(errors.CheckViolation):
        migrated.execute(insert, ("uid-bad", "Exploded"))
    with pytest.raises(errors.CheckViolation):
        migrated.execute("INSERT INTO mljob_results (job_uid, item_id, outcome) VALUES ('u', 'i', 'maybe')")
    row = migrated.execute(
        "SELECT phase, total, dispatched, processed, failed, spec FROM mljob_jobs WHERE uid = 'uid-ok'"
    ).fetchone()
    assert row == ("Pending", 0, 0, 0, 0, {})


def test_results_primary_key_makes_upserts_idempotent(
    migrated: psycopg.Connection[tuple[object, ...]],
) -> None:
    # No job row exists: results must still be recordable (no FK to mljob_jobs).
    insert = "INSERT INTO mljob_results (job_uid, item_id, outcome, result) VALUES (%s, %s, %s, %s::jsonb)"
    migrated.execute(insert, ("job-x", "item-1", "succeeded", '{"y": 1}'))
    with pytest.raises(errors.UniqueViolation):
        migrated.execute(insert, ("job-x", "item-1", "failed", None))

    upsert = insert + " ON CONFLICT (job_uid, item_id) DO NOTHING"
    cur = migrated.execute(upsert, ("job-x", "item-1", "failed", None))
    assert cur.rowcount == 0
    rows = migrated.execute("SELECT outcome, result, attempts FROM mljob_results").fetchall()
    assert rows == [("succeeded", {"y": 1}, 1)]


def test_items_migration_backfills_items_that_already_have_results(pg_dsn: str, schema: str) -> None:
    """A ledger upgraded while jobs had results keeps recognising those results as items."""
    first = load_migrations()[0]
    assert first.version == "0001_initial"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(first.sql, prepare=False)
        conn.execute(
            "CREATE TABLE mljob_schema_migrations (version text PRIMARY KEY, applied_at timestamptz)"
        )
        conn.execute("INSERT INTO mljob_schema_migrations (version) VALUES ('0001_initial')")
        conn.execute(
            "INSERT INTO mljob_results (job_uid, item_id, outcome) VALUES "
            "('job-a', 'i1', 'succeeded'), ('job-a', 'i2', 'failed'), ('job-b', 'i1', 'succeeded')"
        )
        assert apply_migrations(conn, schema) == [v for v in _all_versions() if v != "0001_initial"]
        rows = conn.execute("SELECT job_uid, item_id FROM mljob_items ORDER BY 1, 2").fetchall()
    assert rows == [("job-a", "i1"), ("job-a", "i2"), ("job-b", "i1")]


def test_items_primary_key(migrated: psycopg.Connection[tuple[object, ...]]) -> None:
    insert = "INSERT INTO mljob_items (job_uid, item_id) VALUES (%s, %s)"
    migrated.execute(insert, ("job-x", "item-1"))
    migrated.execute(insert, ("job-y", "item-1"))  # the same id in another job is another item
    with pytest.raises(errors.UniqueViolation):
        migrated.execute(insert, ("job-x", "item-1"))
