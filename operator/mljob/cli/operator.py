"""`mljob operator`: its arguments and settings; `mljob.controller.main` runs it."""

from __future__ import annotations

import argparse
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
    parser.add_argument(
        "--priority", help="kopf peering priority (default: $MLJOB_PRIORITY, else from host name and pid)"
    )
    parser.add_argument("--peering-name", help="the (Cluster)KopfPeering to join (default: default)")
    parser.add_argument(
        "--liveness", help="serve kopf's liveness endpoint at this URL, e.g. http://0.0.0.0:8080/healthz"
    )
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
        priority=args.priority,
        peering_name=args.peering_name,
        liveness_endpoint=args.liveness,
        run_collector=False if args.no_collector else None,
        log_level="DEBUG" if args.verbose else None,
    )  # SettingsError: `mljob` prints it and exits 2

    from mljob.controller.main import run_operator

    return run_operator(config)
