"""Fixtures of the integration tests, on the session's stack: Redis by key prefix, Postgres by
schema (migrated), NATS as the admin; and the worlds several test modules share: the collector's
private results stream (support.collecting), the exhausted-deliveries jobs (support.exhausting)
and the private nats-server of the permission tests (support.private_nats).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from redis.asyncio import Redis

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.jobs_store import JobsStore
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore, make_pool
from mljob.db.migrate import apply_migrations
from support.collecting import ResultsStream, make_results_stream
from support.exhausting import PIPELINE as PIPELINE_OF_EXHAUSTED
from support.exhausting import Job, NewJob, make_job
from support.private_nats import WORKERS, Identity, Server, World, connect, opened_world, private_server
from support.stack import StackEnv

# --- Redis, Postgres, NATS of the stack -------------------------------------------------------


@pytest.fixture
def pg_schema(stack: StackEnv) -> Iterator[str]:
    """A fresh Postgres schema name per test; dropped afterwards."""

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')  # type: ignore[arg-type]


@pytest.fixture
async def redis(stack: StackEnv) -> AsyncIterator[Redis]:
    """An async Redis client on the stack."""
    client = Redis.from_url(stack.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    """A key prefix of this test only; its keys (and only those) are removed afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    keys = [k async for k in redis.scan_iter(match=f"{name}:*", count=1000)]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
async def nc(stack: StackEnv) -> AsyncIterator[NATS]:
    """A NATS connection as the stack's admin identity (streams, consumers, any subject)."""
    client = await stack.nats()
    yield client
    await client.close()


@pytest.fixture
def state(redis: Redis, prefix: str) -> JobState:
    return JobState(redis, prefix=prefix)


@pytest.fixture
async def store(stack: StackEnv, pg_schema: str) -> AsyncIterator[ResultsStore]:
    """A ResultsStore on a fresh, migrated schema."""
    with psycopg.connect(stack.postgres_dsn) as conn:
        apply_migrations(conn, schema=pg_schema)
    pool = make_pool(stack.postgres_dsn, pg_schema, max_size=4)
    await pool.open()
    yield ResultsStore(pool)
    await pool.close()


@pytest.fixture
def jobs(store: ResultsStore) -> JobsStore:
    """The jobs table of the same schema as `store`."""
    return JobsStore(store.pool)


# --- the collector's world (support.collecting) ------------------------------------------------


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
async def results(js: JetStreamContext) -> AsyncIterator[ResultsStream]:
    """A results stream and durable of this test only, deleted afterwards."""
    made = await make_results_stream(js)
    yield made
    await js.delete_stream(made.stream)


# --- exhausted deliveries (support.exhausting) -------------------------------------------------


@pytest.fixture
async def advisories(nc: NATS) -> AsyncIterator[str]:
    """A durable advisory consumer of this test only (new advisories from now on)."""
    js = nc.jetstream()
    await jetstream.ensure_advisory_stream(js)
    name = f"test-{uuid.uuid4().hex[:10]}"
    await js.add_consumer(
        protocol.ADVISORY_STREAM,
        ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            max_deliver=-1,
            ack_wait=30.0,
        ),
    )
    yield name
    await js.delete_consumer(protocol.ADVISORY_STREAM, name)


@pytest.fixture
async def new_job(nc: NATS, store: ResultsStore, state: JobState) -> AsyncIterator[NewJob]:
    """Makes jobs (`support.exhausting.make_job`); their streams are deleted after the test."""
    made: list[str] = []

    async def make(items: list[str], first: str, registered: list[str] | None = None) -> Job:
        job = await make_job(nc, store, state, items, first, registered)
        made.append(job.uid)
        return job

    yield make
    for uid in made:
        await jetstream.delete_job_tasks(nc.jetstream(), PIPELINE_OF_EXHAUSTED, uid)


# --- the private nats-server of the permission tests (support.private_nats) --------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """nats-server on the stack's config, plus a worker scoped to one pipeline (one per module)."""
    with private_server(tmp_path_factory.mktemp("nats-permissions")) as made:
        yield made


@pytest.fixture
async def world(server: Server) -> AsyncIterator[World]:
    async with opened_world(server) as made:
        yield made


@pytest.fixture(params=WORKERS)
async def worker(request: pytest.FixtureRequest, server: Server) -> AsyncIterator[Identity]:
    """The stack's all-pipelines worker and the one scoped to PIPELINE: both must pass."""
    identity = await connect(server, request.param)
    try:
        yield identity
    finally:
        await identity.nc.close()
