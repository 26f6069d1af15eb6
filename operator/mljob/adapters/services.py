"""Long-lived connections shared by every job: NATS/JetStream, Redis, a Postgres pool, Kubernetes.

A dependency that is down at start-up gets one clear log line naming it, then retries with
backoff; the operator never crash-loops with a stack trace. One that refuses the credentials, or
a migration Postgres refuses, raises `natsconn.CannotStart` instead: retrying cannot heal it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from psycopg_pool import AsyncConnectionPool

from mljob.adapters import bootstrap
from mljob.adapters.jobs_store import JobsStore
from mljob.adapters.kube import Kube, load_config
from mljob.adapters.redis_state import Client as Redis
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore
from mljob.api.models import MAX_STALL_TIMEOUT_SECONDS
from mljob.settings import OperatorSettings

log = logging.getLogger(__name__)


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
    """The operator's connections (every bucket and stream it uses), retried until they answer,
    and the stores over them; CannotStart for what retrying cannot heal."""
    opened = await bootstrap.open_connections(settings, name="mljob-operator", log=log)
    assert opened.registry is not None  # asked for by default
    kube = Kube(load_config(settings.kube_threads), settings.kube_threads)
    return assemble(settings, opened.nc, opened.registry, opened.redis, opened.pool, kube)


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
