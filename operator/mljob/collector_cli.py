"""`mljob collector`: run the result collector as its own process (scale it with replicas).

At start-up it applies the Postgres migrations, ensures the shared results stream and its durable
consumer, and checks Redis. A dependency that is not reachable yet gives one clear log line naming
it (no stack-trace loop) and is retried until it answers or the process is told to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

log = logging.getLogger("mljob.collector")

T = TypeVar("T")

RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 15.0


def add_parser(subparsers: Any) -> None:
    """Register the `collector` sub-command (defaults from the MLJOB_* environment)."""
    parser = subparsers.add_parser("collector", help="consume worker results into Postgres and Redis")
    parser.add_argument("--nats-url", default=os.environ.get("MLJOB_NATS_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("MLJOB_REDIS_URL"))
    parser.add_argument("--postgres-dsn", default=os.environ.get("MLJOB_POSTGRES_DSN"))
    parser.add_argument(
        "--postgres-schema",
        default=os.environ.get("MLJOB_POSTGRES_SCHEMA") or None,
        help="schema for the tables (default: the server's search_path)",
    )
    parser.add_argument("--batch", type=int, default=256, help="results per fetch (default: 256)")
    parser.add_argument("--redis-prefix", default=os.environ.get("MLJOB_REDIS_PREFIX", "mljob"))
    parser.add_argument("--log-level", default=os.environ.get("MLJOB_LOG_LEVEL", "INFO"))
    parser.set_defaults(func=_cmd_collector)


def _where(url: str) -> str:
    """host:port of a URL or DSN, without credentials, for log lines."""
    try:
        parts = urlsplit(url)
        if parts.hostname:
            return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    except ValueError:
        pass
    return "(configured address)"


def _cmd_collector(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    missing = [
        flag
        for flag, value in (
            ("--nats-url/MLJOB_NATS_URL", args.nats_url),
            ("--redis-url/MLJOB_REDIS_URL", args.redis_url),
            ("--postgres-dsn/MLJOB_POSTGRES_DSN", args.postgres_dsn),
        )
        if not value
    ]
    if missing:
        print(f"error: set {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.batch < 1:
        print("error: --batch must be >= 1", file=sys.stderr)
        return 2
    asyncio.run(serve(args))
    return 0


async def _retry(name: str, where: str, attempt: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T | None:
    """Run ``attempt`` until it succeeds (its value) or ``stop`` is set (None); one line per cause."""
    delay = RETRY_INITIAL_SECONDS
    last = ""
    while not stop.is_set():
        try:
            return await attempt()
        except Exception as err:
            line = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            if line != last:
                log.warning("%s unreachable at %s (%s); retrying", name, where, line)
                last = line
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(delay * 2, RETRY_MAX_SECONDS)
    return None


async def _until_stopped(coro: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await ``coro`` unless ``stop`` is set first (then cancel it and return None)."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return None


async def serve(args: argparse.Namespace) -> None:
    """Connect to everything (retrying), then run the collector until SIGTERM/SIGINT."""
    import nats
    import psycopg
    from redis.asyncio import Redis

    from mljob.adapters.jetstream import ensure_results_stream
    from mljob.adapters.redis_state import JobState
    from mljob.adapters.results_store import ResultsStore, make_pool
    from mljob.collector import Collector
    from mljob.db.migrate import apply_migrations_async

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def migrate() -> list[str]:
        async with await psycopg.AsyncConnection.connect(args.postgres_dsn, connect_timeout=5) as conn:
            return await apply_migrations_async(conn, schema=args.postgres_schema)

    pg_where = _where(args.postgres_dsn)
    applied = await _retry("Postgres", pg_where, migrate, stop)
    if applied is None:
        return
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))

    nats_where = _where(args.nats_url)
    nats_errors: set[str] = set()

    async def on_error(err: Exception) -> None:
        line = f"{type(err).__name__}: {err}"
        if line not in nats_errors:  # one line per distinct cause, never a stack trace
            nats_errors.add(line)
            log.warning("NATS unreachable at %s (%s); retrying", nats_where, line)

    async def on_disconnected() -> None:
        if not stop.is_set():  # a disconnect while shutting down is ours
            log.warning("NATS disconnected from %s; reconnecting", nats_where)

    async def on_reconnected() -> None:
        nats_errors.clear()
        log.info("NATS reconnected to %s", nats_where)

    nc = await _until_stopped(
        nats.connect(
            args.nats_url,
            name="mljob-collector",
            max_reconnect_attempts=-1,
            reconnect_time_wait=2,
            connect_timeout=5,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        ),
        stop,
    )
    if nc is None:
        return
    redis = Redis.from_url(args.redis_url, socket_timeout=5, socket_connect_timeout=5)
    pool = make_pool(args.postgres_dsn, args.postgres_schema, min_size=1, max_size=4, name="collector")
    js = nc.jetstream()

    async def ensure_stream() -> bool:
        await ensure_results_stream(js)
        return True

    async def ping_redis() -> bool:
        await redis.ping()
        return True

    try:
        if await _retry("NATS JetStream", nats_where, ensure_stream, stop) is None:
            return
        if await _retry("Redis", _where(args.redis_url), ping_redis, stop) is None:
            return
        await pool.open(wait=False)
        collector = Collector(
            js,
            nc,
            JobState(redis, prefix=args.redis_prefix),
            ResultsStore(pool),
            batch=args.batch,
        )
        log.info("collector running (batch %d)", args.batch)
        await collector.run(stop)
        log.info("collector stopped")
    finally:
        await pool.close()
        await redis.aclose()
        try:
            await nc.drain()
        except Exception:
            await nc.close()
