"""`mljob dev stack restart SERVICE`: one service stopped by PID and started again on the same
port with the same data. Runs on a private NATS + Redis + Postgres (not the session's stack)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from mljob_dev.devstack.stack import Stack
from support.harness import connect_nats
from support.stack import ROOT


@pytest.fixture(scope="module")
def private_stack() -> Iterator[Stack]:
    # Where `mljob dev stack up` puts its own: the postgres user (when run as root) can reach it.
    directory = Path(tempfile.mkdtemp(prefix="mljob-restart-"))
    directory.chmod(0o755)
    stack = Stack(directory=directory)
    stack.env["MLJOB_STACK_DIR"] = str(directory)
    try:
        stack.start_nats()
        stack.start_redis()
        stack.start_postgres()
        stack.save()
        yield stack
    finally:
        stack.stop()  # reads the PIDs a restart wrote to the state file
        shutil.rmtree(directory, ignore_errors=True)


def restart(stack: Stack, service: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "mljob.cli.main",
        "dev",
        "stack",
        "restart",
        service,
        "--dir",
        str(stack.directory),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def pids(directory: Path) -> dict[str, int]:
    return Stack.load(directory).pids


async def _publish_and_read(env: dict[str, str], pipeline: str, publish: bool) -> int:
    """Publish one task into a pipeline's stream (as the operator identity may), or count them."""
    from mljob import protocol
    from mljob.adapters import jetstream

    nc = await connect_nats(env)
    try:
        js = nc.jetstream()
        if publish:
            await jetstream.ensure_pipeline_stream(js, pipeline)
            await js.publish(protocol.task_subject(pipeline, "kept"), b"kept")
        return int((await js.stream_info(protocol.task_stream(pipeline))).state.messages)
    finally:
        await nc.close()


def test_nats_keeps_its_jetstream_file_store_and_port(private_stack: Stack) -> None:
    url = private_stack.env["MLJOB_NATS_URL"]
    assert asyncio.run(_publish_and_read(dict(private_stack.env), "kept", publish=True)) == 1
    before = pids(private_stack.directory)["nats-server"]
    restart(private_stack, "nats")
    assert pids(private_stack.directory)["nats-server"] != before
    assert Stack.load(private_stack.directory).env["MLJOB_NATS_URL"] == url
    # The same credentials and CA still work: the restarted server kept its config and certificate.
    assert asyncio.run(_publish_and_read(dict(Stack.load(private_stack.directory).env), "kept", False)) == 1


def test_postgres_keeps_its_data_and_port(private_stack: Stack) -> None:
    dsn = private_stack.env["MLJOB_POSTGRES_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (7)")
        held = psycopg.connect(dsn, autocommit=True)  # a pooled client never disconnects by itself
    restart(private_stack, "postgres")
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [(7,)]


def test_redis_comes_back_on_its_port_empty(private_stack: Stack) -> None:
    client = redis.Redis.from_url(private_stack.env["MLJOB_REDIS_URL"])
    client.set("k", "v")
    restart(private_stack, "redis")
    assert client.ping() and client.get("k") is None  # no persistence configured: documented
    client.close()


def test_an_unknown_service_is_refused(private_stack: Stack) -> None:
    cmd = [
        sys.executable,
        "-m",
        "mljob.cli.main",
        "dev",
        "stack",
        "restart",
        "etcd",
        "--dir",
        str(private_stack.directory),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "nats, redis, postgres" in done.stderr
