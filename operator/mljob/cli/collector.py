"""`mljob collector`: its arguments and settings; `mljob.collector.main` runs it."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from mljob.settings import CollectorSettings, load
from mljob.transport import natsconn

log = logging.getLogger("mljob.collector")


def add_parser(subparsers: Any) -> None:
    """Register the `collector` sub-command (defaults from the MLJOB_* settings, see mljob.settings)."""
    parser = subparsers.add_parser("collector", help="consume worker results into Postgres and Redis")
    parser.add_argument("--nats-url", help="default: $MLJOB_NATS_URL")
    parser.add_argument("--redis-url", help="default: $MLJOB_REDIS_URL")
    parser.add_argument("--postgres-dsn", help="default: $MLJOB_POSTGRES_DSN")
    parser.add_argument(
        "--postgres-schema", help="schema for the tables (default: $MLJOB_POSTGRES_SCHEMA, else search_path)"
    )
    parser.add_argument("--batch", help="results per fetch (default: $MLJOB_COLLECTOR_BATCH, else 256)")
    parser.add_argument(
        "--loops",
        help="batches stored at once, each fetched on its own (default: $MLJOB_COLLECTOR_LOOPS, else 2)",
    )
    parser.add_argument("--redis-prefix", help="default: $MLJOB_REDIS_PREFIX, else mljob")
    parser.add_argument("--log-level", help="default: $MLJOB_LOG_LEVEL, else INFO")
    parser.set_defaults(func=_cmd_collector)


def _cmd_collector(args: argparse.Namespace) -> int:
    settings = load(
        CollectorSettings,
        nats_url=args.nats_url,
        redis_url=args.redis_url,
        postgres_dsn=args.postgres_dsn,
        postgres_schema=args.postgres_schema,
        collector_batch=args.batch,
        collector_loops=args.loops,
        redis_prefix=args.redis_prefix,
        log_level=args.log_level,
    )  # SettingsError: `mljob` prints it and exits 2
    from mljob.collector.main import serve
    from mljob.ops import logs

    logs.setup(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except natsconn.CannotStart as err:
        log.error("%s", err)
        return 1
    return 0
