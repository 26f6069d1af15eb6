"""`mljob operator`: run the kopf operator embedded, with its connections and the collector."""

from __future__ import annotations

import argparse
import asyncio
import logging
import zlib
from typing import Any

from mljob.settings import OperatorSettings, default_worker_id, load


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

    import kopf

    import mljob.handlers  # noqa: F401 - registers the handlers
    from mljob import logs
    from mljob.health import HealthServer, Readiness

    logs.setup(config.log_level, config.log_format)
    readiness = Readiness()
    memo = kopf.Memo(config=config, readiness=readiness)
    priority = peering_priority(config)
    if config.peering:
        logging.getLogger("mljob.operator").info(
            "kopf peering %r with priority %d", config.peering_name, priority
        )

    async def main() -> None:
        server = HealthServer(config.metrics_port, readiness)
        await server.start()
        try:
            await kopf.operator(
                clusterwide=not config.namespaces,
                namespaces=config.namespaces,
                standalone=not config.peering,
                # Given at all, these make kopf wait for the peering CRDs: only with --peering.
                priority=priority if config.peering else None,
                peering_name=config.peering_name if config.peering else None,
                liveness_endpoint=config.liveness_endpoint,
                memo=memo,
            )
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except Exception as err:
        if not cannot_start(err):
            raise
        return 1  # kopf logged the startup handler's PermanentError: the one line saying why
    return 0


def cannot_start(err: BaseException) -> bool:
    """Whether kopf stopped because start-up met a failure that retrying cannot heal."""
    from mljob.natsconn import CannotStart

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, CannotStart):
            return True
        seen = seen.__cause__
    return False


def peering_priority(config: OperatorSettings) -> int:
    """The configured priority, else one derived from host name (the pod name) and pid.

    kopf pauses every peer while two live ones share a priority, so HA replicas need distinct
    ones; a Deployment's pods have no ordinal, but distinct names: a 31-bit hash of the name
    makes a tie between a few replicas about a one-in-a-billion event.
    """
    if config.priority is not None:
        return config.priority
    if not config.peering:
        return 0
    return zlib.crc32(default_worker_id().encode()) & 0x7FFFFFFF
