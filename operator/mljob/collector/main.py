"""The collector as its own process (`mljob collector`; scale it with replicas).

At start-up it opens what it needs through `adapters.bootstrap` (the start-up every process
shares): NATS, the shared results stream and its durable consumer, Redis, the Postgres
migrations and a pool. A dependency that is not reachable yet gives one clear log line per cause
naming it (no stack-trace loop) and is retried until it answers or the process is told to stop;
one that refuses the credentials, or a migration Postgres refuses, ends the process with one line
and exit status 1 (retrying cannot heal it). /readyz turns ready only once everything answered.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from mljob.settings import CollectorSettings

if TYPE_CHECKING:
    from mljob.ops.health import Readiness

log = logging.getLogger("mljob.collector")

#: A collector's Postgres pool: each loop stores one batch at a time.
POOL_SIZE = 4
#: Bounds each Redis call, so a hung Redis leaves the batch for redelivery instead of stalling.
REDIS_TIMEOUT_SECONDS = 5.0


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
    from mljob.adapters.bootstrap import open_connections
    from mljob.adapters.jetstream import ensure_results_stream
    from mljob.adapters.redis_state import JobState
    from mljob.adapters.results_store import ResultsStore
    from mljob.collector.results import Collector
    from mljob.ops.health import store_checks

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    opened = await open_connections(
        settings,
        name="mljob-collector",
        log=log,
        stop=stop,
        streams=("results",),
        pool_size=POOL_SIZE,
        redis_timeout=REDIS_TIMEOUT_SECONDS,
    )
    if opened is None:
        return
    try:
        readiness.connected(store_checks(opened.nc, opened.redis, opened.pool))
        js = opened.js
        collector = Collector(
            js,
            opened.nc,
            JobState(opened.redis, prefix=settings.redis_prefix),
            ResultsStore(opened.pool),
            batch=settings.collector_batch,
            loops=settings.collector_loops,
            ensure=lambda: ensure_results_stream(js, settings.stream_replicas),
        )
        log.info("collector running (batch %d, %d loops)", settings.collector_batch, settings.collector_loops)
        await collector.run(stop)
        log.info("collector stopped")
    finally:
        await opened.close()  # sets stop first: closing on purpose is not a disconnection to report
