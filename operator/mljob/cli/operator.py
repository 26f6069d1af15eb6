"""`mljob operator`: its arguments and settings; `mljob.controller.main` runs it."""

from __future__ import annotations

import argparse
import os
import sys
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
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="HA replicas: only the holder of the leader Lease reconciles (all of them watch)",
    )
    parser.add_argument("--lease-name", help="the leader Lease (default: mljob-operator)")
    parser.add_argument(
        "--lease-namespace", help="namespace of the leader Lease (default: the pod's namespace)"
    )
    # Deprecated: kopf peering is gone; --peering means --leader-elect, the others are ignored.
    parser.add_argument("--peering", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--priority", help=argparse.SUPPRESS)
    parser.add_argument("--peering-name", help=argparse.SUPPRESS)
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
    if args.peering or os.environ.get("MLJOB_PEERING"):
        print(
            "warning: --peering (MLJOB_PEERING) is deprecated: it now means --leader-elect "
            "(MLJOB_LEADER_ELECTION); kopf peering is no longer used",
            file=sys.stderr,
        )
    if args.priority is not None or args.peering_name is not None:
        print(
            "warning: --priority and --peering-name are ignored (kopf peering is no longer used)",
            file=sys.stderr,
        )
    config = load(
        OperatorSettings,
        nats_url=args.nats_url,
        redis_url=args.redis_url,
        postgres_dsn=args.postgres_dsn,
        reconcile_interval=args.reconcile_interval,
        namespaces=args.namespace,
        leader_election=True if (args.leader_elect or args.peering) else None,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        liveness_endpoint=args.liveness,
        run_collector=False if args.no_collector else None,
        log_level="DEBUG" if args.verbose else None,
    )  # SettingsError: `mljob` prints it and exits 2

    from mljob.controller.main import run_operator

    return run_operator(config)
