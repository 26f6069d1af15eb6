"""`mljob status|items|retry|results|watch|cancel` (also `kubectl mljob ...`): looking at and
steering MLJobs from a terminal, on `mljob.client`.

kubectl's conventions: `-n/--namespace` (else the kubeconfig context's), `-A` (watch),
`-o` for the output, `--kubeconfig` and `--context`. Exit status 0 when done, 1 when a server
refused or could not answer (not found, no right, unavailable), 2 for bad usage; errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from typing import Any

from mljob.settings import DEFAULT_API_SERVICE

COMMANDS = ("status", "items", "retry", "results", "watch", "cancel")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", help="the job's namespace (default: the kubeconfig context's)")
    parser.add_argument("--kubeconfig", help="kubeconfig file(s) (default: $KUBECONFIG, else ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument(
        "--api-url", help="the read-only API's URL (default: $MLJOB_API_URL, else the service proxy)"
    )
    parser.add_argument(
        "--api-service",
        help="NAMESPACE/NAME[:PORT] of the API's Service "
        f"(default: $MLJOB_API_SERVICE, else {DEFAULT_API_SERVICE})",
    )
    parser.add_argument(
        "--token", help="bearer token for the API (default: $MLJOB_API_TOKEN, else the kubeconfig user's)"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds a request may take (default: 30)"
    )


def add_parsers(subparsers: Any) -> None:
    """Register the six job commands on `mljob`'s (or `kubectl mljob`'s) subparsers."""
    status = subparsers.add_parser(
        "status", help="a job on one screen: phase, counts, rate, ETA, the four stores side by side"
    )
    status.add_argument("name")
    status.add_argument("-o", "--output", choices=("table", "wide", "json", "yaml"), default="table")
    _common(status)
    status.set_defaults(func=_cmd_status)

    items = subparsers.add_parser(
        "items", help="a job's items with outcome, reason, error, attempts, worker, time"
    )
    items.add_argument("name")
    which = items.add_mutually_exclusive_group()
    for outcome in ("failed", "pending", "succeeded"):
        which.add_argument(f"--{outcome}", dest="outcome", action="store_const", const=outcome)
    items.add_argument("--reason", help="failed items of this reason only (HandlerFailed, Lost, ...)")
    items.add_argument(
        "-o", "--output", choices=("table", "wide", "csv", "json", "jsonl", "yaml"), default="table"
    )
    items.add_argument("--limit", type=_positive, help="at most this many items (then the cursor to go on)")
    items.add_argument("--after", help="start after this cursor (printed by --limit)")
    items.add_argument(
        "--chunk-size", type=_positive, default=500, help="items per request (1-1000, default 500)"
    )
    _common(items)
    items.set_defaults(func=_cmd_items)

    retry = subparsers.add_parser("retry", help="a new MLJob of a job's failed items, linked to it")
    retry.add_argument("name")
    retry.add_argument("--reason", help="only the failed items of this reason")
    retry.add_argument("--name", dest="new_name", help="the new MLJob's name (default: NAME-retry-xxxxx)")
    retry.add_argument(
        "--ids-only", action="store_true", help="retry by id alone when the original's item source is gone"
    )
    retry.add_argument(
        "--max-inline-items",
        type=_positive,
        default=None,
        help="more items than this go into ConfigMaps (default and at most 10,000)",
    )
    retry.add_argument("--dry-run", action="store_true", help="print what would be created, create nothing")
    retry.add_argument("-o", "--output", choices=("name", "json", "yaml"), default="name")
    retry.add_argument("--wait", action="store_true", help="then wait for it with a progress bar")
    _common(retry)
    retry.set_defaults(func=_cmd_retry)

    results = subparsers.add_parser("results", help="every result of a job, streamed (jsonl, csv, parquet)")
    results.add_argument("name")
    results.add_argument("-o", "--format", choices=("jsonl", "csv", "parquet"), default="jsonl")
    results.add_argument("--output", dest="file", help="write to FILE (default: stdout)")
    _common(results)
    results.set_defaults(func=_cmd_results)

    watch = subparsers.add_parser(
        "watch", help="live progress bars of jobs (all of the namespace's without NAME)"
    )
    watch.add_argument("names", nargs="*", metavar="NAME")
    watch.add_argument("-A", "--all-namespaces", action="store_true")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between redraws (default 1)")
    _common(watch)
    watch.set_defaults(func=_cmd_watch)

    cancel = subparsers.add_parser("cancel", help="cancel a job (spec.cancel: true)")
    cancel.add_argument("name")
    cancel.add_argument("--wait", action="store_true", help="wait until it is Cancelled")
    cancel.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
    _common(cancel)
    cancel.set_defaults(func=_cmd_cancel)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number expected, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"1 or more expected, got {value}")
    return value


def _client(args: argparse.Namespace) -> Any:
    from mljob.client import Client

    return Client(
        args.namespace,
        kubeconfig=args.kubeconfig,
        context=args.context,
        api_url=args.api_url,
        api_service=args.api_service,
        token=args.token,
        timeout=args.request_timeout,
    )


def guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command whose ClientErrors become `error: <line>` and their exit status."""

    def run(args: argparse.Namespace) -> int:
        from mljob.client.errors import ClientError

        try:
            return command(args)
        except ClientError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        except TimeoutError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # `| head`: the reader has seen enough
            sys.stderr.close()
            return 0
        except KeyboardInterrupt:
            return 130
        except Exception as err:  # a defect of the client: still one line, naming what broke
            print(
                f"error: {args.command} failed unexpectedly ({type(err).__name__}: {err}); "
                "please report it with the command that gave it",
                file=sys.stderr,
            )
            return 1

    return run


def _dump(data: Any, fmt: str) -> None:
    if fmt == "json":
        json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return
    from mljob.client.errors import require

    yaml: Any = require("yaml", "-o yaml", extra="client")
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


@guarded
def _cmd_status(args: argparse.Namespace) -> int:
    import time

    from mljob.client import statusview

    with _client(args) as client:
        summary = client.summary(args.name)
        current, eta = client.rate_of(summary)
    if args.output in ("json", "yaml"):
        _dump(statusview.as_data(summary, current, eta), args.output)
    else:
        lines = statusview.render(summary, current, eta, time.time(), wide=args.output == "wide")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


@guarded
def _cmd_items(args: argparse.Namespace) -> int:
    from mljob.client import output
    from mljob.client.errors import UsageError

    if args.reason and args.outcome not in (None, "failed"):
        raise UsageError(f"--reason: only failed items have one; drop --{args.outcome}")
    outcome = "failed" if args.reason else args.outcome
    if args.chunk_size > 1000:
        raise UsageError(f"--chunk-size: 1 to 1000, got {args.chunk_size}")
    with _client(args) as client:
        pages = client.pages(args.name, outcome, args.reason, None, args.chunk_size, args.after, args.limit)
        written, resume = output.write_items(pages, args.output, sys.stdout)
    if args.limit is not None and resume is not None:
        print(f"{written:,} items shown; more after --after {resume}", file=sys.stderr)
    return 0


@guarded
def _cmd_retry(args: argparse.Namespace) -> int:
    from mljob.api.models import MAX_INLINE_ITEMS
    from mljob.client.manifests import RETRY_ITEMS

    inline = min(args.max_inline_items or MAX_INLINE_ITEMS, MAX_INLINE_ITEMS)
    with _client(args) as client:
        made = client.retry_manifests(args.name, args.reason, None, args.new_name, args.ids_only, inline)
        count = int(made.job["metadata"]["annotations"][RETRY_ITEMS])
        if args.dry_run:
            documents = [*made.configmaps, made.job]
            if args.output == "name":
                print(made.name)
            else:
                _dump(
                    documents[0]
                    if len(documents) == 1
                    else {"apiVersion": "v1", "kind": "List", "items": documents},
                    args.output,
                )
            return 0
        created = client.create(made)
        new = str(created["metadata"]["name"])
        what = f"its {count:,} failed items" + (f" of reason {args.reason}" if args.reason else "")
        where = " (items in ConfigMaps)" if made.configmaps else ""
        print(
            f"created MLJob {client.namespace}/{new}: a retry of {args.name}, {what}{where}", file=sys.stderr
        )
        if args.output == "name":
            print(new)
        else:
            _dump(created, args.output)
        if args.wait:
            status = client.wait(new, progress=True)
            return 0 if status.get("phase") == "Succeeded" else 1
    return 0


@guarded
def _cmd_results(args: argparse.Namespace) -> int:
    with _client(args) as client:
        written = client.export(args.name, args.file, args.format)
    if args.file:
        unit = "rows" if args.format == "parquet" else "bytes"
        print(f"wrote {written:,} {unit} to {args.file}", file=sys.stderr)
    return 0


@guarded
def _cmd_watch(args: argparse.Namespace) -> int:
    from mljob.client.progress import Painter
    from mljob.client.watching import watch

    tty = sys.stdout.isatty()
    painter = Painter(sys.stdout, tty, shutil.get_terminal_size().columns if tty else 0)
    with _client(args) as client:
        namespace = None if args.all_namespaces else client.namespace
        try:
            ended = watch(client.jobs, namespace, args.names, painter, interval=max(args.interval, 0.1))
        except KeyboardInterrupt:
            return 0
    unhappy = [job for job in ended if job.deleted or job.phase != "Succeeded"]
    for job in unhappy:
        print(
            f"error: MLJob {job.namespace}/{job.name} ended {'deleted' if job.deleted else job.phase}",
            file=sys.stderr,
        )
    return 1 if unhappy else 0


@guarded
def _cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = client.cancel(args.name)
        phase = (body.get("status") or {}).get("phase") or "Pending"
        if phase in ("Succeeded", "Failed", "Cancelled"):
            print(f"MLJob {client.namespace}/{args.name} has already finished ({phase}): nothing to cancel")
            return 0
        print(f"mljob.mljob.dev/{args.name} cancel requested (was {phase})")
        if args.wait:
            status = client.wait(args.name, timeout=args.timeout, progress=False)
            print(f"mljob.mljob.dev/{args.name} {status.get('phase')}")
    return 0
