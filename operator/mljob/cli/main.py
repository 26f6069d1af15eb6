"""The `mljob` command: operator, worker, collector, the read-only API, migrations, CRD rendering,
the job commands (`status`, `items`, `retry`, `results`, `watch`, `cancel`, also `kubectl mljob`);
from a source checkout also the development tools (`mljob dev`, `mljob chaos`, from `mljob_dev`)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from mljob.cli.jobs import COMMANDS as JOB_COMMANDS

#: What the operator extra brings (import names).
#: Sub-commands `mljob_dev` adds: named in a wheel's help, refused there with one line.
DEV_COMMANDS = ("dev", "chaos")
OPERATOR_MODULES = ("kopf", "kubernetes", "redis", "psycopg", "psycopg_pool", "yaml")
#: What the client extra brings, for the job commands (mljob.cli.jobs, also `kubectl mljob`).
CLIENT_MODULES = ("kubernetes", "yaml")


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


def _not_installed(args: argparse.Namespace) -> int:
    print(
        f"error: `mljob {args.command}` is a development tool: run it from a source checkout "
        "(`make venv`); the wheel and the image do not carry it",
        file=sys.stderr,
    )
    return 2


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

    from mljob.cli.api import add_parser as add_api_parser
    from mljob.cli.collector import add_parser as add_collector_parser
    from mljob.cli.jobs import add_parsers as add_job_parsers
    from mljob.cli.operator import add_parser as add_operator_parser
    from mljob.cli.worker import add_parser as add_worker_parser

    add_operator_parser(sub)
    add_collector_parser(sub)
    add_api_parser(sub)
    add_worker_parser(sub)
    add_job_parsers(sub)
    try:
        from mljob_dev.cli import add_parsers as add_dev_parsers
    except ImportError:  # an installed wheel or image: the development tools stay in the repository
        for name in DEV_COMMANDS:
            placeholder = sub.add_parser(name, help="development tools: in a source checkout only")
            placeholder.set_defaults(func=_not_installed)
    else:
        add_dev_parsers(sub)
    return parser


#: Subcommand -> (extra, modules it brings): checked before parsing, so a worker-only install
#: gets one line naming the extra instead of an ImportError.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "operator": ("operator", OPERATOR_MODULES),
    "collector": ("operator", OPERATOR_MODULES),
    "api": ("operator", OPERATOR_MODULES),
    "chaos": ("operator", OPERATOR_MODULES),
    "migrate": ("operator", OPERATOR_MODULES),
    "crd": ("operator", OPERATOR_MODULES),
    "dev stack": ("devstack", ("cryptography", "psycopg")),
    **{command: ("client", CLIENT_MODULES) for command in JOB_COMMANDS},
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
