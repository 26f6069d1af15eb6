"""`mljob worker`: the worker SDK's command line (flags override the MLJOB_* settings)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register the `worker` subcommand on the `mljob` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker",
        help="run a handler over the tasks of a pipeline's jobs",
        description="Pull the tasks of every active MLJob of a pipeline and run the handler on each. "
        "Each flag's default comes from its MLJOB_* variable (see the README's settings table).",
    )
    parser.add_argument("--pipeline", help="pipeline whose jobs to serve (default: $MLJOB_PIPELINE)")
    parser.add_argument(
        "--handler",
        required=True,
        help="package.module:function taking a TaskContext (or, marked @batch_handler, a list of them)",
    )
    parser.add_argument("--concurrency", help="handlers at once (default: $MLJOB_WORKER_CONCURRENCY, else 8)")
    parser.add_argument("--batch", help="most tasks per fetch (default: $MLJOB_WORKER_BATCH, else 16)")
    parser.add_argument(
        "--batch-size",
        help="batch handlers: most tasks per call "
        "(default: $MLJOB_WORKER_BATCH_SIZE, else the handler's max_size, else 16)",
    )
    parser.add_argument(
        "--batch-wait-seconds",
        help="batch handlers: longest wait for a batch to fill "
        "(default: $MLJOB_WORKER_BATCH_WAIT_SECONDS, else the handler's max_wait, else 0.05)",
    )
    parser.add_argument(
        "--nats-url", help="NATS server (default: $MLJOB_NATS_URL, else nats://127.0.0.1:4222)"
    )
    parser.add_argument(
        "--grace-seconds",
        help="on SIGTERM, how long in-flight tasks may finish before they are NAKed "
        "(default: $MLJOB_WORKER_GRACE_SECONDS, else 20)",
    )
    parser.add_argument(
        "--worker-id", help="name in results and logs (default: $MLJOB_WORKER_ID, else host-pid)"
    )
    parser.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING or ERROR (default: $MLJOB_LOG_LEVEL, else INFO)"
    )
    parser.set_defaults(func=_cmd_worker)


def _cmd_worker(args: argparse.Namespace) -> int:
    from mljob.ops import logs
    from mljob.settings import WorkerSettings, load
    from mljob.worker.handler import HandlerLoadError, load_handler
    from mljob.worker.worker import run_worker

    config = load(
        WorkerSettings,
        pipeline=args.pipeline,
        nats_url=args.nats_url,
        concurrency=args.concurrency,
        batch=args.batch,
        batch_size=args.batch_size,
        batch_wait_seconds=args.batch_wait_seconds,
        grace_seconds=args.grace_seconds,
        worker_id=args.worker_id,
        log_level=args.log_level,
    )  # SettingsError: `mljob` prints it and exits 2
    # The processes' one logging set-up (it filters asyncio's TLS noise).
    logs.setup(config.log_level, config.log_format)
    try:
        handler = load_handler(args.handler)
    except HandlerLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_worker(handler, config)
