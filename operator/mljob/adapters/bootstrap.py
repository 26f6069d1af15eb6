"""The one start-up of every process that holds the stores: NATS, JetStream, Redis, Postgres.

One order and one policy, so the operator, the collector and the runbook tools report a missing
dependency the same way. The order: NATS; the buckets and streams asked for (where a JetStream
that does not answer shows); Redis; the Postgres migrations, then a pool. A dependency that does
not answer yet gives one line per distinct cause naming it and where it was looked for
(host:port, never credentials), `cannot reach Redis at 10.0.0.5:6379 (ConnectionError: ...);
retrying`, and is retried with back-off until it answers or `stop` is set. One that refuses
(credentials, a migration Postgres refuses) raises `natsconn.CannotStart` with its one line:
retrying cannot heal it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, TypeVar, overload

import psycopg
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from mljob.adapters import jetstream, redis_state
from mljob.adapters.results_store import make_pool
from mljob.db import migrate
from mljob.settings import CollectorSettings, StoreSettings
from mljob.transport import natsconn

T = TypeVar("T")

#: What a process may ask to exist before it starts: the job registry bucket, the shared results
#: stream, the JetStream advisory stream (the operator needs all three, the collector the results).
Stream = Literal["registry", "results", "advisory"]
ALL_STREAMS: tuple[Stream, ...] = ("registry", "results", "advisory")
_STREAM_NAMES: dict[Stream, str] = {
    "registry": "job registry",
    "results": "results stream",
    "advisory": "advisory stream",
}

RETRY_INITIAL_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0
#: Bounds each attempt, so an address that swallows packets is reported like a refused one.
CONNECT_TIMEOUT_SECONDS = 5
#: NATS's wait between reconnects once connected.
RECONNECT_WAIT_SECONDS = 1.0
#: How long the first Postgres connection of the pool may take before the attempt is retried.
POOL_OPEN_SECONDS = 5.0


class Unreachable(Exception):
    """With `once`: a dependency did not answer its one attempt (the message names it and where)."""


@dataclass
class Connections:
    """What start-up opened; the caller builds its stores over these and closes them with `close`."""

    nc: Client
    js: JetStreamContext
    redis: redis_state.Client
    pool: AsyncConnectionPool
    #: the job registry bucket, when "registry" was among the streams asked for
    registry: KeyValue | None = None
    #: set when closing on purpose: NATS's "disconnected" is then not reported
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def close(self) -> None:
        """Pool, Redis, then NATS drained (closed if draining fails); errors closing are ignored."""
        self.stop.set()
        await _close_all(self.nc, self.redis, self.pool, drain=True)


@overload
async def open_connections(
    settings: StoreSettings,
    *,
    name: str,
    log: logging.Logger,
    stop: None = None,
    streams: tuple[Stream, ...] = ...,
    pool_size: int = ...,
    redis_timeout: float | None = ...,
    once: bool = ...,
    migrations: bool = ...,
) -> Connections: ...


@overload
async def open_connections(
    settings: StoreSettings,
    *,
    name: str,
    log: logging.Logger,
    stop: asyncio.Event,
    streams: tuple[Stream, ...] = ...,
    pool_size: int = ...,
    redis_timeout: float | None = ...,
    once: bool = ...,
    migrations: bool = ...,
) -> Connections | None: ...


async def open_connections(
    settings: StoreSettings,
    *,
    name: str,
    log: logging.Logger,
    stop: asyncio.Event | None = None,
    streams: tuple[Stream, ...] = ALL_STREAMS,
    pool_size: int = 10,
    redis_timeout: float | None = None,
    once: bool = False,
    migrations: bool = True,
) -> Connections | None:
    """Connect to everything in one order, retrying what does not answer yet.

    `name` names the NATS client and the Postgres pool; `log` gets the start-up lines. Returns
    None only when `stop` was set before everything answered (whatever was open is closed).
    `redis_timeout` bounds each Redis call once running (None: no bound). `once` is for runbook
    tools that must fail fast: each dependency gets one attempt, and the first that does not
    answer raises `Unreachable`. `migrations=False` (a process that only reads, `mljob api`)
    applies none: one connection of its own checks that Postgres answers and takes the
    credentials, then the pool opens. Streams are set up only for `CollectorSettings` (they
    carry the replica count). Raises `natsconn.CannotStart` for what retrying cannot heal.
    Failing, it sets `stop` (the process is ending) so that closing is not reported as an outage.
    """
    stop = stop if stop is not None else asyncio.Event()  # set only to close quietly
    if streams and not isinstance(settings, CollectorSettings):
        raise TypeError("setting up streams needs CollectorSettings (MLJOB_STREAM_REPLICAS)")

    def report(what: str) -> natsconn.Report:
        if once:

            def fail(line: str, delay: float) -> None:
                raise Unreachable(f"{what} ({line})")

            return fail
        return natsconn.once_per_cause(log, what)

    async def step(
        what: str, attempt: Callable[[], Awaitable[T]], permanent: natsconn.Permanent | None = None
    ) -> T:
        value = await natsconn.retry(
            attempt,
            report(what),
            stop=stop,
            initial=RETRY_INITIAL_SECONDS,
            maximum=RETRY_MAX_SECONDS,
            permanent=permanent,
        )
        if value is None:
            raise _Stopped
        return value

    nats_at = natsconn.where(settings.nats_url)
    nc = await natsconn.connect(
        settings,
        name=name,
        log=log,
        report=report(f"cannot reach NATS at {nats_at}"),
        stop=stop,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        reconnect_time_wait=RECONNECT_WAIT_SECONDS,
        initial_delay=RETRY_INITIAL_SECONDS,
        max_delay=RETRY_MAX_SECONDS,
    )
    if nc is None:
        return None
    redis = redis_state.connect(
        settings.redis_url,
        settings.redis_max_connections,
        cluster=settings.redis_cluster,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=redis_timeout,
        health_check_interval=30,
    )
    try:
        js = nc.jetstream()
        replicas = settings.stream_replicas if isinstance(settings, CollectorSettings) else 1

        def setting_up(stream: Stream) -> str:
            return (
                f"cannot set up the {_STREAM_NAMES[stream]} on NATS at {nats_at} "
                f"(MLJOB_STREAM_REPLICAS={replicas})"
            )

        registry: KeyValue | None = None
        if "registry" in streams:
            registry = await step(setting_up("registry"), lambda: jetstream.registry(js, replicas))
        ensures: tuple[tuple[Stream, Callable[[JetStreamContext, int], Awaitable[None]]], ...] = (
            ("results", jetstream.ensure_results_stream),
            ("advisory", jetstream.ensure_advisory_stream),
        )
        for stream, ensure in ensures:
            if stream in streams:
                await step(setting_up(stream), partial(_done, ensure, js, replicas))

        redis_at = natsconn.where(settings.redis_url)
        await step(
            f"cannot reach Redis at {redis_at}", partial(_done, redis.ping), redis_state.refused(redis_at)
        )

        async def migrate_and_open() -> tuple[list[str], AsyncConnectionPool]:
            if migrations:
                applied = await migrate.startup_migrate(
                    settings.postgres_dsn, settings.postgres_schema, connect_timeout=CONNECT_TIMEOUT_SECONDS
                )
            else:  # a connection of its own: a pool reports a refused password as a timeout
                applied = []
                await (
                    await psycopg.AsyncConnection.connect(
                        settings.postgres_dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS
                    )
                ).close()
            # A pool whose first connection timed out is closed by psycopg: a fresh one each time.
            pool = make_pool(
                settings.postgres_dsn, settings.postgres_schema, min_size=1, max_size=pool_size, name=name
            )
            try:
                await pool.open(wait=True, timeout=POOL_OPEN_SECONDS)
            except BaseException:
                await pool.close()
                raise
            return applied, pool

        postgres_at = postgres_where(settings.postgres_dsn)
        applied, pool = await step(
            f"cannot reach Postgres at {postgres_at}",
            migrate_and_open,
            migrate.refused(postgres_at, settings.postgres_schema),
        )
    except _Stopped:
        await _close_all(nc, redis, None, drain=False)
        return None
    except BaseException:
        stop.set()  # the process is ending: closing is not a disconnection to report
        await _close_all(nc, redis, None, drain=False)
        raise
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return Connections(nc=nc, js=js, redis=redis, pool=pool, registry=registry, stop=stop)


class _Stopped(Exception):
    """`stop` was set before a dependency answered."""


def postgres_where(dsn: str) -> str:
    """Every host:port of a Postgres DSN, never its credentials: a multi-host DSN (a primary and
    its standbys, `target_session_attrs=read-write`) names each host it tries."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return natsconn.where(dsn)
    hosts = str(info.get("host") or "").split(",")
    ports = str(info.get("port") or "").split(",")
    if len(hosts) < 2:
        return natsconn.where(dsn)
    ports = ports if len(ports) == len(hosts) else ports[:1] * len(hosts)
    return ",".join(f"{host}:{port}" if port else host for host, port in zip(hosts, ports, strict=True))


async def _done(call: Callable[..., Awaitable[object]], *args: object) -> bool:
    """`call(*args)`, then True: to `retry` None means "stopped", and these return None when done."""
    await call(*args)
    return True


async def _close_all(
    nc: Client, redis: redis_state.Client, pool: AsyncConnectionPool | None, *, drain: bool
) -> None:
    """Close what start-up opened; a failure to close is nobody's to handle (the process ends)."""
    if pool is not None:
        with contextlib.suppress(Exception):
            await pool.close()
    with contextlib.suppress(Exception):
        await redis.aclose()
    if drain:
        try:
            await nc.drain()
            return
        except Exception:
            pass
    with contextlib.suppress(Exception):
        await nc.close()
