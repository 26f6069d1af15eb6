"""`mljob operator`: run the kopf operator embedded, with its connections and the collector."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from mljob.settings import OperatorSettings, load


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("operator", help="run the MLJob operator")
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="watch only this namespace (repeatable); default: cluster-wide",
    )
    parser.add_argument("--peering", action="store_true", help="enable kopf peering for HA replicas")
    parser.add_argument("--reconcile-interval", help="seconds between reconcile ticks")
    parser.add_argument(
        "--no-collector",
        action="store_true",
        help="do not run the results collector in-process (run `mljob collector`)",
    )
    parser.add_argument("--nats-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--postgres-dsn")
    parser.add_argument("--verbose", "-v", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load(
        OperatorSettings,
        nats_url=args.nats_url,
        redis_url=args.redis_url,
        postgres_dsn=args.postgres_dsn,
        reconcile_interval=args.reconcile_interval,
        namespaces=args.namespace,
        peering=True if args.peering else None,
        run_collector=False if args.no_collector else None,
        log_level="DEBUG" if args.verbose else None,
    )  # SettingsError: `mljob` prints it and exits 2

    import kopf

    import mljob.handlers  # noqa: F401 - registers the handlers

    logging.basicConfig(
        level=getattr(logging, config.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kopf.objects", "kopf._core.engines.peering", "kopf.activities.probe"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # we log "cannot reach Postgres" ourselves
    memo = kopf.Memo(config=config)
    asyncio.run(
        kopf.operator(
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            standalone=not config.peering,
            memo=memo,
        )
    )
    return 0
