"""Every benchmark on one local stack (`make bench`): each script's tables, one after the other.

    python -m bench.run_all [--items N] [--workers 1,2,4] [--repeat R] [--json FILE]

Flags are passed on to each benchmark (`--workers` only to those that have workers, `--items`
not to mljob_latency, sized by its own jobs and items per job); without `--items` each uses its
own default (the full-size figures of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from . import common

#: (module, has --workers), in the order they run.
BENCHMARKS: list[tuple[str, bool]] = [
    ("bench.baseline_dispatch", False),
    ("bench.baseline_raw", True),
    ("bench.baseline_celery", True),
    ("bench.mljob_dispatch", False),
    ("bench.mljob_e2e", True),
    ("bench.mljob_latency", False),
    ("bench.mljob_many", False),
    ("bench.mljob_huge", True),
]
#: Benchmarks sized by their own flags (jobs, items per job): --items is not passed on to them.
OWN_SIZE = {"bench.mljob_latency", "bench.mljob_many"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", help="items per run (default: each benchmark's own)")
    p.add_argument("--workers", help="worker process counts, comma-separated (default: each benchmark's own)")
    p.add_argument("--repeat", help="runs per configuration; the median is shown")
    p.add_argument("--json", dest="json_path", help="append each shown run to this file as a JSON line")
    p.add_argument("--stack-dir", help="reuse the stack there, or start one there (default: a new one)")
    p.add_argument("--keep-stack", action="store_true", help="leave a stack this run started running")
    p.add_argument("--ha", action="store_true", help="on the clustered stack (`mljob dev stack up --ha`)")
    p.add_argument("--only", help="comma-separated module names to run (e.g. baseline_raw)")
    p.add_argument("--many-jobs", help="mljob_many's scales, e.g. 100,1000 (default: its own, to 10,000)")
    args = p.parse_args(argv)
    chosen = [(m, w) for m, w in BENCHMARKS if not args.only or m.rsplit(".", 1)[1] in args.only.split(",")]
    failed: list[str] = []
    with common.local_stack(args) as stack:
        for module, has_workers in chosen:
            cmd = [sys.executable, "-m", module]
            for flag, value in (
                ("--items", None if module in OWN_SIZE else args.items),
                ("--repeat", args.repeat),
                ("--json", args.json_path),
            ):
                if value:
                    cmd += [flag, value]
            if has_workers and args.workers:
                cmd += ["--workers", args.workers]
            if module == "bench.mljob_many" and args.many_jobs:
                cmd += ["--jobs", args.many_jobs]
            print(f"\n<!-- python {' '.join(cmd[1:])} -->", flush=True)
            if subprocess.run(cmd, env=stack.child_env(), cwd=common.ROOT).returncode != 0:
                failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
