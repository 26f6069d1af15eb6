"""`mljob api` as a process: serve the routes, connect to the stores, stop on SIGTERM/SIGINT.

Why a process of its own, not a part of the operator: it answers people, at their pace and
load, with nothing to decide; the operator's one event loop reconciles every job and must not
queue behind a million-row export. It writes nothing: no migrations (it waits for the tables
the operator or the collector made), no streams, no keys; only the apiserver's reviews, which
store nothing.

It listens at once (/healthz answers, /readyz says "not connected yet", per-job reads answer
503), then opens NATS, Redis and Postgres through `adapters.bootstrap` (the start-up every
process shares: one line per cause, retried with back-off; what retrying cannot heal ends it
with exit status 1). Once connected, a store that goes down only blanks its part of a summary.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from mljob.adapters.bootstrap import open_connections
from mljob.adapters.kube import Kube, load_config
from mljob.adapters.redis_state import JobState
from mljob.httpapi.auth import Reviewer
from mljob.httpapi.routes import MAX_EXPORTS, ApiState, make_app
from mljob.httpapi.summary import Stores
from mljob.ops.health import Readiness, store_checks
from mljob.settings import ApiSettings

log = logging.getLogger("mljob.api")

#: Postgres connections: one per export streaming at once, and some for pages and summaries.
POOL_SIZE = MAX_EXPORTS + 4
#: Kubernetes calls in flight at once (reviews and MLJob reads).
KUBE_THREADS = 8
#: Bounds each Redis call, so a hung Redis blanks its part of a summary instead of holding it.
REDIS_TIMEOUT_SECONDS = 5.0
#: On stop, how long requests under way (an export) may run before their connections close.
SHUTDOWN_SECONDS = 5.0


class CannotListen(Exception):
    """The API's address is taken or not ours to bind (the message names it and what to set)."""


async def serve(settings: ApiSettings) -> None:
    """Serve until SIGTERM/SIGINT. Raises CannotListen, or natsconn.CannotStart at start-up."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    kube = Kube(load_config(KUBE_THREADS), KUBE_THREADS)
    state = ApiState(reviewer=Reviewer(kube, settings.api_review_cache_seconds), kube=kube)
    runner = web.AppRunner(make_app(state), access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.api_host, settings.api_port).start()
        except OSError as err:
            raise CannotListen(
                f"cannot listen on {settings.api_host}:{settings.api_port} ({err.strerror or err}): "
                "set MLJOB_API_PORT (--port) to a free port"
            ) from None
        log.info("serving the read-only API on %s:%d", settings.api_host, settings.api_port)
        opened = await open_connections(
            settings,
            name="mljob-api",
            log=log,
            stop=stop,
            streams=(),
            pool_size=POOL_SIZE,
            redis_timeout=REDIS_TIMEOUT_SECONDS,
            migrations=False,
        )
        if opened is None:
            return
        try:
            state.stores = Stores(
                pool=opened.pool, state=JobState(opened.redis, settings.redis_prefix), js=opened.js
            )
            # Ready while Postgres answers: the ledger is what every endpoint reads; Redis and NATS
            # down only blank their parts of a summary, and a Service without endpoints would
            # answer nothing at all.
            checks = store_checks(opened.nc, opened.redis, opened.pool)
            state.ready = Readiness({"Postgres": checks["Postgres"]}).problem
            log.info("connected to NATS, Redis and Postgres")
            await stop.wait()
        finally:
            await runner.cleanup()  # requests under way end before their stores close
            await opened.close()
    finally:
        await runner.cleanup()
        kube.close()
        log.info("API stopped")
