"""End to end with mljob: one MLJob of N items, no-op handler, K `mljob worker`s, apply → Succeeded.

The operator (`mljob operator --namespace <ns>`, the stack's operator identity, the collector
in-process) and K `mljob worker --handler bench.handlers:noop` processes (the stack's worker
identity, default concurrency and batch) are running, the item ConfigMaps exist. The clock runs
from the moment a watch sees the MLJob created until it sees `status.phase` Succeeded: dispatch,
every task through a worker, every result stored by the collector (Postgres, Redis), the finish
and its status write. In the same run, on the same stack, at the same worker counts: the raw
script (bench/baseline_raw.py) and Celery (bench/baseline_celery.py), both with their defaults,
each stopping its clock when the last result is stored. mljob's own "last result stored" (the
largest `recorded_at` of the job's rows in `mljob_results`, the collector's insert time) is shown
beside its apply → Succeeded.

    python -m bench.mljob_e2e --items 20000 --workers 1,2,4 [--profile DIR]

`--profile DIR` attaches py-spy to the operator and to every worker for the measured interval and
prints their top functions (figures of a profiled run are slower: compare them with nothing).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import baseline_celery, baseline_raw, common, mljob_common

PIPELINE = "bench-mljob-e2e"
HANDLER = "bench.handlers:noop"
MLJOB = "mljob: apply → Succeeded"
RAW = "raw script"
CELERY = "Celery (loop)"


@dataclass
class Measured:
    run: common.Run
    #: seconds from the MLJob's creation to its last result stored (mljob only)
    stored_seconds: float | None = None


def measure(stack: common.BenchStack, args: argparse.Namespace, workers: int, logs: Path) -> Measured:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    with mljob_common.session(stack, logs, f"e2e-{workers}w") as run:
        operator = run.start_operator()
        procs = run.start_workers(PIPELINE, HANDLER, workers)
        with mljob_common.JobWatch(stack, run.namespace) as watch:
            run.wait_serving(procs)
            run.warm_up(watch, PIPELINE, "terminal")  # the whole path works before the clock runs
            roles = {"operator": [operator.pid], "workers": [p.pid for p in procs]}
            job, cpu, _ = run.timed_job(watch, name, PIPELINE, args.items, "terminal", roles, args.profile)
        if job.phase != "Succeeded" or int(job.status.get("processed") or 0) != args.items:
            raise common.BenchError(f"the MLJob ended {job.phase}: {job.status}")
        with run.pg() as pg:
            row = pg.execute(
                "SELECT extract(epoch FROM max(recorded_at)), count(*) FROM mljob_results WHERE job_uid = %s",
                (job.uid,),
            ).fetchone()
        assert job.created is not None and job.dispatched is not None and job.terminal is not None
        if row is None or row[0] is None or int(row[1]) != args.items:
            raise common.BenchError(f"mljob_results holds {row[1] if row else 0} rows of {args.items}")
    result = common.Run(
        benchmark="end-to-end",
        system=MLJOB,
        items=args.items,
        seconds=job.terminal[1] - job.created[1],
        cpu=cpu,
        workers=workers,
        dispatch_seconds=job.dispatched[1] - job.created[1],
    )
    return Measured(result, stored_seconds=float(row[0]) - job.created[0])


def ratios(shown: dict[tuple[str, int], Measured], workers: list[int]) -> str:
    """mljob against the raw script and Celery at each worker count, with issue 8's goals."""
    rows = []
    for k in workers:
        ours = shown[(MLJOB, k)]
        raw = shown[(RAW, k)].run.items_per_second
        celery = shown[(CELERY, k)].run.items_per_second
        stored = ours.run.items / ours.stored_seconds if ours.stored_seconds else None
        rows.append(
            [
                str(k),
                f"{ours.run.items_per_second / raw:.2f}",
                f"{ours.run.items_per_second / celery:.1f}x",
                f"{stored / raw:.2f}" if stored else "-",
                f"{stored / celery:.1f}x" if stored else "-",
            ]
        )
    headers = [
        "workers",
        "mljob / raw (goal ≥ 0.6)",
        "mljob / Celery (goal ≥ 5x)",
        "to last stored: / raw",
        "to last stored: / Celery",
    ]
    return common.markdown_table(headers, rows)


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=20_000)
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="profile the operator and the workers with py-spy; raw profiles go to DIR",
    )
    p.add_argument(
        "--log-dir", help="where the operator's and workers' logs go (default: a new temporary directory)"
    )
    p.add_argument("--no-baselines", action="store_true", help="measure mljob only (e.g. with --profile)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    logs = mljob_common.log_dir(args, "bench-mljob-e2e")
    raw_args = baseline_raw.build_parser().parse_args(["--items", str(args.items)])
    celery_args = baseline_celery.build_parser().parse_args(["--items", str(args.items)])
    with common.local_stack(args) as stack:
        description = common.machine(stack)
        mljob_common.install_crds(stack)
        measured: dict[tuple[str, int], list[Measured]] = {}
        for k in args.workers:
            for _ in range(max(1, args.repeat)):  # alternate, so drift hits every system alike
                if not args.no_baselines:
                    measured.setdefault((RAW, k), []).append(
                        Measured(baseline_raw.measure(stack, raw_args, k))
                    )
                    measured.setdefault((CELERY, k), []).append(
                        Measured(baseline_celery.measure(stack, celery_args, k))
                    )
                measured.setdefault((MLJOB, k), []).append(measure(stack, args, k, logs))
    shown: dict[tuple[str, int], Measured] = {}
    for key, runs in measured.items():
        middle = common.median_run([m.run for m in runs])
        shown[key] = next(m for m in runs if m.run is middle)
    runs_each = "one run each" if args.repeat <= 1 else f"median of {args.repeat} runs each"
    title = f"End to end, mljob against the baselines: {args.items:,} items, no-op handler, {runs_each}"
    text = [description, common.report(title, [m.run for m in shown.values()], args.json_path)]
    if not args.no_baselines:
        text.append(ratios(shown, args.workers))
    stored = [
        [
            str(k),
            common.fmt(m.run.seconds, 2),
            common.fmt(m.stored_seconds, 2),
            common.fmt(m.run.dispatch_seconds, 2),
        ]
        for (system, k), m in shown.items()
        if system == MLJOB
    ]
    text.append(
        common.markdown_table(
            ["mljob workers", "apply → Succeeded s", "apply → last result stored s", "apply → Running s"],
            stored,
        )
    )
    text.append(
        "mljob's clock: from the watch seeing the MLJob created to it seeing `Succeeded`; the baselines' "
        "from their producer's go to the last result stored. For mljob, `operator` includes the collector."
    )
    if args.profile:
        text.append(
            "(profiled run: py-spy was attached to the operator and the workers; these figures are slower)"
        )
        text.extend(mljob_common.profile_report())
    print("\n\n".join(text))
    print(f"logs: {logs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
