"""The `mljob` command: operator, worker, collector, CRD rendering and the local dev stack."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

POINTER = Path(".stack") / "dir"
#: What the operator extra brings (import names).
OPERATOR_MODULES = ("kopf", "kubernetes", "redis", "psycopg", "psycopg_pool", "yaml")


def _cmd_crd(args: argparse.Namespace) -> int:
    from mljob.api import crd

    root = Path(args.root)
    if args.check:
        stale = [p for p, text in crd.rendered_files(root).items() if not p.exists() or p.read_text() != text]
        if stale:
            print("stale CRD files (run `mljob crd`): " + ", ".join(map(str, stale)), file=sys.stderr)
            return 1
        return 0
    if args.stdout:
        sys.stdout.write(crd.render_yaml())
        return 0
    for path in crd.write(root):
        print(f"wrote {path}")
    return 0


def _stack_dir(args: argparse.Namespace) -> Path:
    if args.dir:
        return Path(args.dir)
    if os.environ.get("MLJOB_STACK_DIR"):
        return Path(os.environ["MLJOB_STACK_DIR"])
    if POINTER.exists():
        return Path(POINTER.read_text().strip())
    raise SystemExit("no running stack found: run `mljob dev stack up` first")


def _cmd_stack(args: argparse.Namespace) -> int:
    from mljob.devstack import stack as devstack
    from mljob.devstack.tools import ToolError

    if args.action == "up":
        try:
            running = devstack.up(Path(args.dir) if args.dir else None)
        except (devstack.StackError, ToolError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        POINTER.parent.mkdir(exist_ok=True)
        POINTER.write_text(str(running.directory))
        print(running.export_lines())
        return 0
    directory = _stack_dir(args)
    if args.action == "restart":
        from mljob.devstack.restart import SERVICES, restart

        if args.service not in SERVICES:
            print(f"error: name the service to restart: {', '.join(SERVICES)}", file=sys.stderr)
            return 2
        try:
            restart(directory, args.service, args.down_seconds)
        except devstack.StackError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"restarted {args.service} in {directory}", file=sys.stderr)
        return 0
    if args.action == "env":
        print(devstack.Stack.load(directory).export_lines())
        return 0
    devstack.down(directory)
    if POINTER.exists() and POINTER.read_text().strip() == str(directory):
        POINTER.unlink()
    return 0


def _cmd_tools(args: argparse.Namespace) -> int:
    from mljob.devstack import tools

    for name in args.names or tools.ensure_all():
        print(tools.ensure(name))
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    import psycopg

    from mljob.db.migrate import apply_migrations

    dsn = args.dsn or os.environ.get("MLJOB_POSTGRES_DSN")
    if not dsn:
        print("error: set --dsn or MLJOB_POSTGRES_DSN", file=sys.stderr)
        return 1
    with psycopg.connect(dsn) as conn:
        applied = apply_migrations(conn, schema=args.schema)
    print("applied: " + (", ".join(applied) or "nothing (up to date)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mljob", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    crd = sub.add_parser("crd", help="render the MLJob CRD from the models")
    crd.add_argument("--root", default=".", help="repository root (default: .)")
    crd.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    crd.add_argument("--stdout", action="store_true", help="print instead of writing files")
    crd.set_defaults(func=_cmd_crd)

    migrate = sub.add_parser("migrate", help="apply the Postgres migrations")
    migrate.add_argument("--dsn")
    migrate.add_argument("--schema")
    migrate.set_defaults(func=_cmd_migrate)

    dev = sub.add_parser("dev", help="local development helpers").add_subparsers(dest="dev", required=True)
    stack = dev.add_parser("stack", help="start/stop the local kube-apiserver, NATS, Redis, Postgres")
    stack.add_argument("action", choices=["up", "down", "env", "restart"])
    stack.add_argument("service", nargs="?", help="restart only: nats, redis or postgres")
    stack.add_argument("--dir", help="stack directory (default: a new temporary directory)")
    stack.add_argument(
        "--down-seconds", type=float, default=0.0, help="restart only: stay down this long first"
    )
    stack.set_defaults(func=_cmd_stack)
    tools_cmd = dev.add_parser("tools", help="build (once) and print the cached Go-built binaries")
    tools_cmd.add_argument("names", nargs="*")
    tools_cmd.set_defaults(func=_cmd_tools)

    from mljob.collector_cli import add_parser as add_collector_parser
    from mljob.operator_cli import add_parser as add_operator_parser
    from mljob.worker.cli import add_parser as add_worker_parser

    add_operator_parser(sub)
    add_collector_parser(sub)
    add_worker_parser(sub)
    try:
        from mljob.chaos_cli import add_parser as add_chaos_parser
    except ImportError:  # a worker-only install: main() names the extra before parsing
        sub.add_parser("chaos", help="inject faults and inspect orphans (needs the operator extra)")
    else:
        add_chaos_parser(sub)
    return parser


#: Subcommand -> (extra, modules it brings): checked before parsing, so a worker-only install
#: gets one line naming the extra instead of an ImportError.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "operator": ("operator", OPERATOR_MODULES),
    "collector": ("operator", OPERATOR_MODULES),
    "chaos": ("operator", OPERATOR_MODULES),
    "migrate": ("operator", OPERATOR_MODULES),
    "crd": ("operator", OPERATOR_MODULES),
    "dev stack": ("devstack", ("cryptography", "psycopg")),
}


def missing_extra(argv: list[str]) -> str | None:
    """The hint to print when the subcommand in `argv` needs an extra that is not installed."""
    words = [word for word in argv if not word.startswith("-")][:2]
    command = " ".join(words) if " ".join(words) in EXTRAS else (words[0] if words else "")
    if command not in EXTRAS:
        return None
    extra, modules = EXTRAS[command]
    if all(importlib.util.find_spec(module) is not None for module in modules):
        return None
    return f"mljob {command} needs the {extra} extra: pip install 'mljob-operator[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    from mljob.settings import SettingsError

    argv = sys.argv[1:] if argv is None else argv
    hint = missing_extra(argv)
    if hint is not None:
        print(hint, file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except SettingsError as err:  # a refused MLJOB_* value or flag: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
