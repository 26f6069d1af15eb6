"""`mljob api`: its arguments and settings; `mljob.httpapi.server` runs it."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from mljob.settings import ApiSettings, load
from mljob.transport import natsconn

log = logging.getLogger("mljob.api")


def add_parser(subparsers: Any) -> None:
    """Register the `api` sub-command (defaults from the MLJOB_* settings, see mljob.settings)."""
    parser = subparsers.add_parser(
        "api", help="serve the read-only HTTP API (job summaries, items, results), checked by Kubernetes RBAC"
    )
    parser.add_argument("--host", help="address to listen on (default: $MLJOB_API_HOST, else 0.0.0.0)")
    parser.add_argument("--port", help="port to listen on (default: $MLJOB_API_PORT, else 8080)")
    parser.add_argument("--nats-url", help="default: $MLJOB_NATS_URL")
    parser.add_argument("--redis-url", help="default: $MLJOB_REDIS_URL")
    parser.add_argument("--postgres-dsn", help="default: $MLJOB_POSTGRES_DSN")
    parser.add_argument(
        "--postgres-schema", help="schema of the tables (default: $MLJOB_POSTGRES_SCHEMA, else search_path)"
    )
    parser.add_argument("--redis-prefix", help="default: $MLJOB_REDIS_PREFIX, else mljob")
    parser.add_argument("--log-level", help="default: $MLJOB_LOG_LEVEL, else INFO")
    parser.set_defaults(func=_cmd_api)


def _cmd_api(args: argparse.Namespace) -> int:
    settings = load(
        ApiSettings,
        api_host=args.host,
        api_port=args.port,
        nats_url=args.nats_url,
        redis_url=args.redis_url,
        postgres_dsn=args.postgres_dsn,
        postgres_schema=args.postgres_schema,
        redis_prefix=args.redis_prefix,
        log_level=args.log_level,
    )  # SettingsError: `mljob` prints it and exits 2
    from kubernetes.config import ConfigException

    from mljob.httpapi.server import CannotListen, serve
    from mljob.ops import logs

    logs.setup(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except ConfigException as err:
        log.error("cannot start: no Kubernetes configuration (in-cluster or KUBECONFIG): %s", err)
        return 1
    except (natsconn.CannotStart, CannotListen) as err:
        log.error("%s", err)
        return 1
    return 0
