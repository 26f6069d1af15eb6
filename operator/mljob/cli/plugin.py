"""`kubectl mljob ...`: the kubectl plugin (the `kubectl-mljob` command on PATH), the same six
commands as `mljob status|items|retry|results|watch|cancel`."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from mljob.cli.jobs import COMMANDS, add_parsers

#: Flags kubectl users put before the command (`kubectl mljob -n team-a status x`) and the
#: commands take after it, with whether each takes a value.
GLOBAL_FLAGS = {"-n": True, "--namespace": True, "--kubeconfig": True, "--context": True, "-A": False}


def hoist(argv: list[str]) -> list[str]:
    """`-n NS status x` as `status x -n NS`: kubectl's global flags may come first."""
    moved: list[str] = []
    rest = list(argv)
    while rest and rest[0].startswith("-") and rest[0] not in ("-h", "--help"):
        flag, _, value = rest[0].partition("=")
        if flag not in GLOBAL_FLAGS:
            break
        takes = GLOBAL_FLAGS[flag] and not value
        moved += rest[: 2 if takes else 1]
        rest = rest[2 if takes else 1 :]
    if not moved or not rest or rest[0] not in COMMANDS:
        return argv
    return [rest[0], *moved, *rest[1:]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl mljob", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mljob.settings import SettingsError

    argv = hoist(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("kubernetes") is None:
        print("kubectl mljob needs the client extra: pip install 'mljob-operator[client]'", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
