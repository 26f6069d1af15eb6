"""`/metrics` and `/readyz` of the operator and the collector, on `MLJOB_METRICS_PORT`.

Readiness answers 200 only while NATS, Redis and Postgres all answer a cheap check (connected
and a PING; PING; `SELECT 1` from the pool), else 503 with one line naming what failed. The
result is cached for a couple of seconds so probes and scrapes never pile load on the stores,
and each check has a short timeout so a hung store reads as not ready instead of a hung probe.
Liveness is kopf's own endpoint (`--liveness`); the collector's is a TCP check of this port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from mljob.adapters.outage import one_line

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[object]]

#: How long a readiness verdict is reused.
CACHE_SECONDS = 2.0
#: How long one store may take to answer its check.
CHECK_TIMEOUT_SECONDS = 2.0


class Readiness:
    """Whether the stores answer; `checks` is None until the process has connected."""

    def __init__(
        self,
        checks: Mapping[str, Check] | None = None,
        *,
        cache_seconds: float = CACHE_SECONDS,
        timeout: float = CHECK_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.checks = checks
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self.clock = clock
        self._verdict: str | None = None
        self._checked_at = -float("inf")
        self._lock = asyncio.Lock()

    def connected(self, checks: Mapping[str, Check]) -> None:
        self.checks = checks
        self._checked_at = -float("inf")

    async def problem(self) -> str | None:
        """None when ready, else one line: "Redis: TimeoutError: ...", "connecting to the stores"."""
        if self.checks is None:
            return "not connected yet to NATS, Redis and Postgres"
        async with self._lock:  # concurrent probes share one round of checks
            if self.clock() - self._checked_at >= self.cache_seconds:
                self._verdict = await self._run(self.checks)
                self._checked_at = self.clock()
            return self._verdict

    async def _run(self, checks: Mapping[str, Check]) -> str | None:
        names = list(checks)
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(checks[n](), self.timeout) for n in names), return_exceptions=True
        )
        failed = [
            f"{name}: {'timed out' if isinstance(err, TimeoutError) else one_line(err)}"
            for name, err in zip(names, outcomes, strict=True)
            if isinstance(err, BaseException)
        ]
        return "; ".join(failed) if failed else None


def store_checks(nc: Any, redis: Any, pool: Any) -> dict[str, Check]:
    """The cheap checks of a process that holds a NATS client, a Redis client and a psycopg pool."""

    async def nats() -> None:
        if not nc.is_connected:
            raise ConnectionError("not connected")
        await nc.flush(timeout=CHECK_TIMEOUT_SECONDS)

    async def postgres() -> None:
        async with pool.connection(timeout=CHECK_TIMEOUT_SECONDS) as conn:
            await conn.execute("SELECT 1")

    return {"NATS": nats, "Redis": redis.ping, "Postgres": postgres}


class HealthServer:
    """The aiohttp server of `/metrics` and `/readyz`; port 0 means none is started."""

    def __init__(self, port: int, readiness: Readiness, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self.readiness = readiness
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if self.port == 0:
            log.info("metrics and readiness not served (MLJOB_METRICS_PORT=0)")
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as err:
            # The work matters more than its metrics: say so loudly and carry on. In a pod the
            # readiness probe then fails, so the problem cannot go unnoticed.
            log.error(
                "cannot serve /metrics and /readyz on port %d (%s); running without them: set "
                "MLJOB_METRICS_PORT to a free port, or 0",
                self.port,
                err.strerror or err,
            )
            await self.stop()
            return
        log.info("serving /metrics and /readyz on port %d", self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _readyz(self, _: web.Request) -> web.Response:
        problem = await self.readiness.problem()
        if problem is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"not ready: {problem}\n")
