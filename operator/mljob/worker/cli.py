"""`mljob worker`: the worker SDK's command line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from mljob.worker.config import (
    DEFAULT_NATS_URL,
    NATS_URL_ENV,
    WorkerConfig,
    default_nats_url,
    default_worker_id,
)


def add_parser(subparsers: Any) -> None:
    """Register the `worker` subcommand on the `mljob` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker",
        help="run a handler over the tasks of a pipeline's jobs",
        description="Pull the tasks of every active MLJob of a pipeline and run the handler on each.",
    )
    parser.add_argument("--pipeline", required=True, help="pipeline whose jobs to serve")
    parser.add_argument("--handler", required=True, help="package.module:function taking a TaskContext")
    parser.add_argument("--concurrency", type=_positive_int, default=8, help="handlers at once (default: 8)")
    parser.add_argument("--batch", type=_positive_int, default=16, help="most tasks per fetch (default: 16)")
    parser.add_argument(
        "--nats-url",
        default=None,
        help=f"NATS server (default: ${NATS_URL_ENV}, else {DEFAULT_NATS_URL})",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=20.0,
        help="on SIGTERM, how long in-flight tasks may finish before they are NAKed (default: 20)",
    )
    parser.add_argument("--worker-id", default=None, help="name in results and logs (default: host-pid)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=_cmd_worker)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _cmd_worker(args: argparse.Namespace) -> int:
    from mljob.worker.handler import HandlerLoadError, load_handler
    from mljob.worker.worker import run_worker

    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = WorkerConfig(
            pipeline=args.pipeline,
            nats_url=args.nats_url or default_nats_url(),
            concurrency=args.concurrency,
            batch=args.batch,
            grace_seconds=args.grace_seconds,
            worker_id=args.worker_id or default_worker_id(),
        )
        handler = load_handler(args.handler)
    except (ValueError, HandlerLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_worker(handler, config)
