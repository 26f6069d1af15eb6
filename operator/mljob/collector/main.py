"""The collector as its own process (`mljob collector`; scale it with replicas).

At start-up it applies the Postgres migrations, ensures the shared results stream and its durable
consumer, and checks Redis. A dependency that is not reachable yet gives one clear log line naming
it (no stack-trace loop) and is retried until it answers or the process is told to stop; one that
refuses the credentials, or a migration Postgres refuses, ends the process with one line and
exit status 1 (retrying cannot heal it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from mljob.settings import CollectorSettings
from mljob.transport import natsconn

if TYPE_CHECKING:
    from mljob.ops.health import Readiness

log = logging.getLogger("mljob.collector")

T = TypeVar("T")

RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 15.0


def _where(url: str) -> str:
    """host:port of a URL or DSN, without credentials, for log lines."""
    try:
        parts = urlsplit(url)
        if parts.hostname:
            return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    except ValueError:
        pass
    return "(configured address)"


async def _retry(
    name: str,
    where: str,
    attempt: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    permanent: natsconn.Permanent,
) -> T | None:
    """Run ``attempt`` until it succeeds (its value) or ``stop`` is set (None); one line per cause.
    A failure ``permanent`` names raises CannotStart."""
    report = natsconn.once_per_cause(log, f"{name} unreachable at {where}")
    return await natsconn.retry(
        attempt,
        report,
        stop=stop,
        initial=RETRY_INITIAL_SECONDS,
        maximum=RETRY_MAX_SECONDS,
        permanent=permanent,
    )


async def serve(settings: CollectorSettings) -> None:
    """Serve /metrics and /readyz (not ready until connected), then connect and collect."""
    from mljob.ops.health import HealthServer, Readiness

    readiness = Readiness()
    server = HealthServer(settings.metrics_port, readiness)
    await server.start()
    try:
        await collect(settings, readiness)
    finally:
        await server.stop()


async def collect(settings: CollectorSettings, readiness: Readiness) -> None:
    """Connect to everything (retrying), then run the collector until SIGTERM/SIGINT."""
    from mljob.adapters import redis_state
    from mljob.adapters.jetstream import ensure_results_stream
    from mljob.adapters.redis_state import JobState
    from mljob.adapters.results_store import ResultsStore, make_pool
    from mljob.collector.results import Collector
    from mljob.db import migrate
    from mljob.ops.health import store_checks

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    pg_where = _where(settings.postgres_dsn)
    applied = await _retry(
        "Postgres",
        pg_where,
        lambda: migrate.startup_migrate(settings.postgres_dsn, settings.postgres_schema),
        stop,
        migrate.refused(pg_where, settings.postgres_schema),
    )
    if applied is None:
        return
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))

    nats_where = _where(settings.nats_url)
    nc = await natsconn.connect(
        settings,
        name="mljob-collector",
        log=log,
        report=natsconn.once_per_cause(log, f"NATS unreachable at {nats_where}"),
        stop=stop,
        connect_timeout=5,
        reconnect_time_wait=2,
        initial_delay=RETRY_INITIAL_SECONDS,
        max_delay=RETRY_MAX_SECONDS,
    )
    if nc is None:
        return
    redis = redis_state.connect(
        settings.redis_url, settings.redis_max_connections, socket_timeout=5, socket_connect_timeout=5
    )
    pool = make_pool(
        settings.postgres_dsn, settings.postgres_schema, min_size=1, max_size=4, name="collector"
    )
    js = nc.jetstream()

    async def ensure_stream() -> bool:
        await ensure_results_stream(js, settings.stream_replicas)
        return True

    async def ping_redis() -> bool:
        await redis.ping()
        return True

    try:
        stream_report = natsconn.once_per_cause(
            log,
            f"cannot set up the results stream on NATS at {nats_where} "
            f"(MLJOB_STREAM_REPLICAS={settings.stream_replicas})",
        )
        if await natsconn.retry(ensure_stream, stream_report, stop=stop, maximum=RETRY_MAX_SECONDS) is None:
            return
        redis_where = _where(settings.redis_url)
        if await _retry("Redis", redis_where, ping_redis, stop, redis_state.refused(redis_where)) is None:
            return
        await pool.open(wait=False)
        readiness.connected(store_checks(nc, redis, pool))
        collector = Collector(
            js,
            nc,
            JobState(redis, prefix=settings.redis_prefix),
            ResultsStore(pool),
            batch=settings.collector_batch,
            loops=settings.collector_loops,
            ensure=lambda: ensure_results_stream(js, settings.stream_replicas),
        )
        log.info("collector running (batch %d, %d loops)", settings.collector_batch, settings.collector_loops)
        await collector.run(stop)
        log.info("collector stopped")
    finally:
        stop.set()  # closing on purpose: not a disconnection to report
        await pool.close()
        await redis.aclose()
        try:
            await nc.drain()
        except Exception:
            await nc.close()
