"""End to end with mljob: one MLJob of N items, K `mljob worker`s, apply → Succeeded, against the raw script.

The operator (`mljob operator --namespace <ns>`, the stack's operator identity, the collector
in-process) and K `mljob worker` processes (the stack's worker identity, their default batch) are
running, the item ConfigMaps exist. The clock runs from the moment a watch sees the MLJob created
until it sees `status.phase` Succeeded: dispatch, every task through a worker, every result
stored by the collector (Postgres, Redis), the finish and its status write. In the same run, on
the same stack, at the same worker counts: the raw script (bench/baseline_raw.py, the limit) with
the same handler and as many tasks in flight per worker, and for the no-op handler Celery
(bench/baseline_celery.py, for information), each stopping its clock when the last result is
stored. mljob's own "last result stored" (the largest `recorded_at` of the job's rows in
`mljob_results`, the collector's insert time) is shown beside its apply → Succeeded.

    python -m bench.mljob_e2e --items 20000 --workers 1,2,4 [--profile DIR]
    python -m bench.mljob_e2e --items 20000 --handler-ms 20 --concurrency 64 --fetch-batch 0

Handlers: the no-op (`bench.handlers:noop_async`, an async function: the raw script runs its
no-op inline on the event loop, so both pay the same for it; `--sync-handler` runs mljob's as a
plain function instead, which the worker calls in a thread, to show what that hop costs) or, with
`--handler-ms`, an `asyncio.sleep` of that long (`bench.handlers:sleep`, as the raw script's).
`--concurrency` is every worker's tasks in flight (mljob: MLJOB_WORKER_CONCURRENCY) and
`--fetch-batch` the most tasks per fetch (MLJOB_WORKER_BATCH), the same for both systems: 256 and
128 by default, as in docs/benchmarks.md (mljob's own defaults, 8 and 16, suit real handlers);
0 leaves each system its own default.

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
HANDLER = "bench.handlers:noop_async"
SYNC_HANDLER = "bench.handlers:noop"
SLEEP_HANDLER = "bench.handlers:sleep"
#: Goals of issue 13 (mljob / raw script, items per second): no-op handler, a sleeping handler.
GOAL_NOOP = 0.7
GOAL_SLEEP = 0.9
#: Goal: mljob's CPU seconds per 1,000 items, every process and server together, / the raw script's.
GOAL_CPU = 1.3
MLJOB = "mljob: apply → Succeeded"
RAW = "raw script"
CELERY = "Celery (loop)"


@dataclass
class Measured:
    run: common.Run
    #: seconds from the MLJob's creation to its last result stored (mljob only)
    stored_seconds: float | None = None
    #: per second since the MLJob's creation: items finished by the workers, stored by the collector
    timeline: list[tuple[int, int, int]] | None = None


def worker_setup(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """The workers' handler and the environment that sets it up (sleep, concurrency)."""
    extra = {"BENCH_HANDLER_MS": f"{args.handler_ms:g}"} if args.handler_ms else {}
    if args.concurrency:
        extra["MLJOB_WORKER_CONCURRENCY"] = str(args.concurrency)
    if args.fetch_batch:
        extra["MLJOB_WORKER_BATCH"] = str(args.fetch_batch)
    if args.handler_ms:
        return SLEEP_HANDLER, extra
    return (SYNC_HANDLER if args.sync_handler else HANDLER), extra


def measure(stack: common.BenchStack, args: argparse.Namespace, workers: int, logs: Path) -> Measured:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    with mljob_common.session(stack, logs, f"e2e-{workers}w") as run:
        operator = run.start_operator(**({"MLJOB_RUN_COLLECTOR": "false"} if args.separate_collector else {}))
        collector = run.start_collector() if args.separate_collector else None
        handler, extra = worker_setup(args)
        procs = run.start_workers(PIPELINE, handler, workers, **extra)
        with mljob_common.JobWatch(stack, run.namespace) as watch:
            run.wait_serving(procs)
            run.warm_up(watch, PIPELINE, "terminal")  # the whole path works before the clock runs
            roles = {"operator": [operator.pid], "workers": [p.pid for p in procs]}
            if collector is not None:
                roles["collector"] = [collector.pid]
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
        with run.pg() as pg:
            seconds = pg.execute(
                "SELECT floor(extract(epoch FROM finished_at) - %s)::int,"
                " floor(extract(epoch FROM recorded_at) - %s)::int FROM mljob_results WHERE job_uid = %s",
                (job.created[0], job.created[0], job.uid),
            ).fetchall()
    result = common.Run(
        benchmark="end-to-end",
        system=MLJOB,
        items=args.items,
        seconds=job.terminal[1] - job.created[1],
        cpu=cpu,
        workers=workers,
        dispatch_seconds=job.dispatched[1] - job.created[1],
    )
    return Measured(result, stored_seconds=float(row[0]) - job.created[0], timeline=per_second(seconds))


def per_second(seconds: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(second, items finished by then, items stored by then) from each row's (finished, stored) second."""
    last = max((max(f, r) for f, r in seconds), default=0)
    finished, stored = [0] * (last + 1), [0] * (last + 1)
    for f, r in seconds:
        finished[max(0, f)] += 1
        stored[max(0, r)] += 1
    out, done, kept = [], 0, 0
    for second in range(last + 1):
        done, kept = done + finished[second], kept + stored[second]
        out.append((second + 1, done, kept))
    return out


def timeline_table(shown: dict[tuple[str, int], Measured]) -> str:
    """Where mljob's time went, per worker count: items through the workers and into the ledger by
    each second after apply (a gap between the two is the collector's backlog)."""
    rows = []
    for (system, k), m in shown.items():
        if system == MLJOB and m.timeline:
            dispatched = m.run.dispatch_seconds or 0.0
            for second, done, kept in m.timeline:
                mark = " (Running)" if second - 1 < dispatched <= second else ""
                rows.append([str(k), f"{second}{mark}", f"{done:,}", f"{kept:,}"])
    headers = ["mljob workers", "seconds after apply", "finished by workers", "stored by the collector"]
    return common.markdown_table(headers, rows)


def total_cpu_per_1000(run: common.Run) -> float:
    """CPU seconds per 1,000 items of every process and server of the run together."""
    return sum(run.cpu.values()) * 1000 / run.items


def ratios(shown: dict[tuple[str, int], Measured], workers: list[int], handler_ms: float) -> str:
    """mljob against the raw script (the goals of issue 13) and Celery (information) per worker count."""
    goal = GOAL_SLEEP if handler_ms else GOAL_NOOP
    rows = []
    for k in workers:
        ours = shown[(MLJOB, k)]
        raw = shown[(RAW, k)].run
        celery = shown.get((CELERY, k))
        stored = ours.run.items / ours.stored_seconds if ours.stored_seconds else None
        speed = ours.run.items_per_second / raw.items_per_second
        cpu = total_cpu_per_1000(ours.run) / total_cpu_per_1000(raw)
        row = [
            str(k),
            f"{speed:.2f} {'met' if speed >= goal else 'missed'}",
            f"{stored / raw.items_per_second:.2f}" if stored else "-",
            f"{total_cpu_per_1000(ours.run):.2f} / {total_cpu_per_1000(raw):.2f}",
            f"{cpu:.2f}" + ("" if handler_ms else f" {'met' if cpu <= GOAL_CPU else 'missed'}"),
        ]
        if not handler_ms:
            row.append(f"{ours.run.items_per_second / celery.run.items_per_second:.1f}x" if celery else "-")
        rows.append(row)
    headers = [
        "workers",
        f"mljob / raw (goal ≥ {goal})",
        "to last stored: / raw",
        "CPU s per 1,000 items, all processes: mljob / raw",
        "CPU ratio" + ("" if handler_ms else f" (goal ≤ {GOAL_CPU})"),
    ]
    if not handler_ms:
        headers.append("mljob / Celery (information)")
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
    p.add_argument(
        "--handler-ms", type=float, default=0.0, help="an asyncio.sleep handler of this long (default: no-op)"
    )
    p.add_argument(
        "--fetch-batch",
        type=int,
        default=128,
        help="most tasks per fetch, every system (mljob: MLJOB_WORKER_BATCH; default 128; 0: each one's own)",
    )
    p.add_argument(
        "--separate-collector",
        action="store_true",
        help="run `mljob collector` as its own process (the chart's collector.enabled), as the raw script's",
    )
    p.add_argument(
        "--sync-handler",
        action="store_true",
        help="mljob runs the no-op as a plain function (a thread hop per call; the raw script stays inline)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=256,
        help="tasks in flight per worker, every system (default 256; 0: each one's own default)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    logs = mljob_common.log_dir(args, "bench-mljob-e2e")
    raw_argv = ["--items", str(args.items), "--handler-ms", str(args.handler_ms)]
    if args.concurrency:
        raw_argv += ["--concurrency", str(args.concurrency)]
    if args.fetch_batch:
        raw_argv += ["--batch", str(args.fetch_batch)]
    raw_args = baseline_raw.build_parser().parse_args(raw_argv)
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
                    if not args.handler_ms:  # Celery: the no-op only, for information
                        measured.setdefault((CELERY, k), []).append(
                            Measured(baseline_celery.measure(stack, celery_args, k))
                        )
                measured.setdefault((MLJOB, k), []).append(measure(stack, args, k, logs))
    shown: dict[tuple[str, int], Measured] = {}
    for key, runs in measured.items():
        middle = common.median_run([m.run for m in runs])
        shown[key] = next(m for m in runs if m.run is middle)
    runs_each = "one run each" if args.repeat <= 1 else f"median of {args.repeat} runs each"
    handler = f"{args.handler_ms:g} ms handler" if args.handler_ms else "no-op handler"
    flight = f", {args.concurrency} tasks in flight per worker" if args.concurrency else ""
    title = f"End to end, mljob against the baselines: {args.items:,} items, {handler}{flight}, {runs_each}"
    text = [description, common.report(title, [m.run for m in shown.values()], args.json_path)]
    if not args.no_baselines:
        text.append(ratios(shown, args.workers, args.handler_ms))
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
    text.append(timeline_table(shown))
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
