"""Start-up failures that retrying cannot heal end the process: one line, exit status 1.

The real `mljob operator`, `mljob collector` and `mljob worker` against the real stack, each with
one setting wrong: NATS refusing a wrong password, Redis refusing a wrong password (an ACL user
of this test), Postgres refusing a user that does not exist (the stack's Postgres trusts every
password, so a wrong user is its wrong credential), and a migration Postgres refuses (a schema
holding a conflicting table). Before, each was retried forever. Unreachable dependencies are
still retried: tests/integration/test_operator_startup.py.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
from redis import Redis

from mljob_dev.devstack.stack import free_port
from support.harness import ROOT, child_env, mljob_cmd
from support.stack import StackEnv

#: An upper bound against a process that retries forever, not a timing.
EXIT_WITHIN_SECONDS = 60

COMMANDS = {
    "operator": ("--namespace", "startup-permanent"),
    "collector": (),
    "worker": ("--pipeline", "startup-permanent", "--handler", "mljob_dev.demo.model:classify"),
}


@pytest.fixture
def redis_user(stack: StackEnv) -> Iterator[str]:
    """A Redis ACL user of this test only, whose password is "right"."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    client = Redis.from_url(stack.redis_url)
    client.acl_setuser(name, enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
    yield name
    client.acl_deluser(name)
    client.close()


@pytest.fixture
def conflicting_schema(stack: StackEnv, pg_schema: str) -> str:
    """A schema where migration 0001 cannot create its first table: one of that name is there."""
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')  # type: ignore[arg-type]
        conn.execute(f'CREATE TABLE "{pg_schema}".mljob_jobs (unrelated integer)')  # type: ignore[arg-type]
    return pg_schema


def with_user(url: str, user: str, password: str | None = None) -> str:
    parts = urlsplit(url)
    auth = f"{user}:{password}" if password is not None else user
    return parts._replace(netloc=f"{auth}@{parts.hostname}:{parts.port}").geturl()


def start(stack: StackEnv, process: str, schema: str, **wrong: str) -> tuple[int, str]:
    """Run `mljob <process>` with the settings in `wrong` until it exits: (status, stderr)."""
    env = child_env(
        stack.as_env("operator" if process == "operator" else process),
        MLJOB_POSTGRES_SCHEMA=schema,
        MLJOB_REDIS_PREFIX="startup-permanent",
        MLJOB_METRICS_PORT=str(free_port()),
        **wrong,
    )
    try:
        done = subprocess.run(
            mljob_cmd(process, *COMMANDS[process]),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=EXIT_WITHIN_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(
            f"mljob {process} still running after {EXIT_WITHIN_SECONDS}s:\n{err.stderr}"
        ) from err
    return done.returncode, done.stderr


def assert_one_clear_line(status: int, stderr: str, *names: str) -> None:
    lines = [line for line in stderr.splitlines() if "cannot start: " in line]
    assert status == 1, stderr
    assert len(lines) == 1, stderr
    assert all(name in lines[0] for name in names), lines[0]
    assert "Traceback" not in stderr and "retrying" not in stderr, stderr


@pytest.mark.parametrize("process", ["operator", "collector", "worker"])
def test_nats_refusing_the_password_ends_the_process(stack: StackEnv, pg_schema: str, process: str) -> None:
    status, stderr = start(stack, process, pg_schema, MLJOB_NATS_PASSWORD="wrong")
    assert_one_clear_line(status, stderr, "NATS at", "refused the credentials", "MLJOB_NATS_PASSWORD")


@pytest.mark.parametrize("process", ["operator", "collector"])
def test_redis_refusing_the_password_ends_the_process(
    stack: StackEnv, pg_schema: str, redis_user: str, process: str
) -> None:
    url = with_user(stack.redis_url, redis_user, "wrong")
    status, stderr = start(stack, process, pg_schema, MLJOB_REDIS_URL=url)
    assert_one_clear_line(status, stderr, "Redis at", "refused the credentials", "MLJOB_REDIS_URL")
    assert "wrong" not in stderr, "the password was logged"


@pytest.mark.parametrize("process", ["operator", "collector"])
def test_postgres_refusing_the_user_ends_the_process(stack: StackEnv, pg_schema: str, process: str) -> None:
    dsn = with_user(stack.postgres_dsn, f"nobody_{uuid.uuid4().hex[:8]}")
    status, stderr = start(stack, process, pg_schema, MLJOB_POSTGRES_DSN=dsn)
    assert_one_clear_line(status, stderr, "Postgres at", "refused the connection", "MLJOB_POSTGRES_DSN")


@pytest.mark.parametrize("process", ["operator", "collector"])
def test_a_failed_migration_ends_the_process(stack: StackEnv, conflicting_schema: str, process: str) -> None:
    status, stderr = start(stack, process, conflicting_schema)
    assert_one_clear_line(
        status,
        stderr,
        "migration 0001_initial failed",
        "mljob_jobs",
        conflicting_schema,
        "MLJOB_POSTGRES_SCHEMA",
    )
