"""Long-lived connections shared by every job: NATS/JetStream, Redis, a Postgres pool, Kubernetes.

A dependency that is down at start-up gets one clear log line naming it, then retries with
backoff; the operator never crash-loops with a stack trace. One that refuses the credentials, or
a migration Postgres refuses, raises `natsconn.CannotStart` instead: retrying cannot heal it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass, field
from typing import TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from mljob.adapters import jetstream, redis_state
from mljob.adapters.jobs_store import JobsStore
from mljob.adapters.kube import Kube, load_config
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore, make_pool
from mljob.api.models import MAX_STALL_TIMEOUT_SECONDS
from mljob.db import migrate
from mljob.settings import OperatorSettings
from mljob.transport import natsconn

log = logging.getLogger(__name__)
T = TypeVar("T")


async def with_retry(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    max_delay: float = 10.0,
    permanent: natsconn.Permanent | None = None,
) -> T:
    """Retry `attempt` until it succeeds, logging one line per failure that names the dependency;
    a failure `permanent` names raises CannotStart."""
    return await natsconn.retry(
        attempt, natsconn.every_failure(log, what), maximum=max_delay, permanent=permanent
    )


#: How often the heartbeat map drops what it no longer needs (at most; only when heartbeats come).
HEARTBEAT_EXPIRY_INTERVAL_SECONDS = 60.0


@dataclass
class Heartbeats:
    """uid -> unix seconds of the last worker heartbeat, bounded by what a decision can use.

    Heartbeats arrive for every job on the account, other installations' included, and a job's
    cleanup is not the only way its loop ends: only uids in `managed` (the jobs this operator
    runs a loop for) are kept, and an entry older than `horizon` (the longest stall timeout a
    job may have; an older heartbeat changes no stall decision) or of a job no longer managed is
    dropped, at most once per `HEARTBEAT_EXPIRY_INTERVAL_SECONDS`.
    """

    managed: Container[str]
    horizon: float = float(MAX_STALL_TIMEOUT_SECONDS)
    seen: dict[str, float] = field(default_factory=dict)
    next_expiry: float = 0.0

    def record(self, uid: str, now: float) -> None:
        if uid in self.managed:
            self.seen[uid] = now
        if now >= self.next_expiry:
            self.expire(now)

    def expire(self, now: float) -> None:
        self.seen = {
            uid: at for uid, at in self.seen.items() if uid in self.managed and now - at < self.horizon
        }
        self.next_expiry = now + HEARTBEAT_EXPIRY_INTERVAL_SECONDS

    def get(self, uid: str) -> float | None:
        return self.seen.get(uid)

    def forget(self, uid: str) -> None:
        self.seen.pop(uid, None)


@dataclass
class Services:
    settings: OperatorSettings
    nc: NATS
    js: JetStreamContext
    registry: KeyValue
    redis: Redis
    state: JobState
    pool: AsyncConnectionPool
    jobs: JobsStore
    results: ResultsStore
    kube: Kube
    #: the uids of the jobs this operator manages (the scheduler's index): heartbeats of other
    #: jobs, other installations' included, are not kept
    managed: Container[str] = field(default_factory=set)
    #: makes a job due for a reconcile at once (the scheduler's `wake`, once it runs)
    waker: Callable[[str], None] = field(default=lambda uid: None)
    #: the last worker heartbeat of each job this operator manages (stall detection, row 5)
    heartbeats: Heartbeats = field(init=False)
    #: jobs dispatching at once: ten thousand MLJobs created together otherwise all register
    #: their items at the same moment and queue on the Postgres pool until its waits time out
    dispatch_slots: asyncio.Semaphore = field(init=False)
    #: jobs waiting for a dispatch slot, oldest first (a dict as an ordered set)
    dispatch_line: dict[str, None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dispatch_slots = asyncio.Semaphore(self.settings.max_concurrent_dispatches)
        self.heartbeats = Heartbeats(managed=self.managed)

    def manage(self, managed: Container[str], waker: Callable[[str], None]) -> None:
        """Hand the scheduler's index and wake-up to everything that feeds it (the collector's
        drained signal, the advisory watcher, heartbeats)."""
        self.managed = managed
        self.waker = waker
        self.heartbeats.managed = managed

    def wake(self, uid: str) -> None:
        self.waker(uid)

    async def close(self) -> None:
        for closing in (self.nc.drain(), self.redis.aclose(), self.pool.close()):
            try:
                await closing
            except Exception as err:
                log.warning("error while closing: %s", err)
        self.kube.close()


async def connect(settings: OperatorSettings) -> Services:
    async def jetstream_enabled(nc: NATS) -> None:
        await nc.jetstream().account_info()

    nc = await natsconn.connect(settings, name="mljob-operator", log=log, ready=jetstream_enabled)
    assert nc is not None  # no stop event: connect returns only once connected
    js = nc.jetstream()
    registry = await with_retry(
        "the NATS job registry", lambda: jetstream.registry(js, settings.stream_replicas)
    )
    await with_retry(
        "the NATS results stream", lambda: jetstream.ensure_results_stream(js, settings.stream_replicas)
    )
    await with_retry(
        "the NATS advisory stream", lambda: jetstream.ensure_advisory_stream(js, settings.stream_replicas)
    )

    redis = redis_state.connect(
        settings.redis_url, settings.redis_max_connections, socket_connect_timeout=3, health_check_interval=30
    )
    redis_at = natsconn.redact(settings.redis_url)
    await with_retry(f"Redis at {redis_at}", redis.ping, permanent=redis_state.refused(redis_at))

    async def migrate_and_open() -> AsyncConnectionPool:
        await migrate.startup_migrate(settings.postgres_dsn, settings.postgres_schema)
        # A pool whose first connection timed out is closed by psycopg: start a fresh one.
        pool = make_pool(settings.postgres_dsn, settings.postgres_schema, min_size=1, max_size=10)
        try:
            await pool.open(wait=True, timeout=5)
        except BaseException:
            await pool.close()
            raise
        return pool

    postgres_at = natsconn.redact(settings.postgres_dsn)
    pool = await with_retry(
        "Postgres", migrate_and_open, permanent=migrate.refused(postgres_at, settings.postgres_schema)
    )
    kube = Kube(load_config(settings.kube_threads), settings.kube_threads)
    return assemble(settings, nc, registry, redis, pool, kube)


def assemble(
    settings: OperatorSettings,
    nc: NATS,
    registry: KeyValue,
    redis: Redis,
    pool: AsyncConnectionPool,
    kube: Kube,
) -> Services:
    """The stores and adapters over opened connections (one place, whoever opened them)."""
    return Services(
        settings=settings,
        nc=nc,
        js=nc.jetstream(),
        registry=registry,
        redis=redis,
        state=JobState(redis, settings.redis_prefix),
        pool=pool,
        jobs=JobsStore(pool),
        results=ResultsStore(pool),
        kube=kube,
    )
