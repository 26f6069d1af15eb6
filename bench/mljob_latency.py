"""Latencies of mljob: last result stored → terminal status, and a crashing item → its failed row.

With the operator (`mljob operator --namespace <ns>`, collector in-process) and K `mljob worker`
processes running (`bench.handlers:noop_or_crash`, kept alive by mljob's demo supervisor, on the
stack's worker identity):

1. J small MLJobs (`--jobs`, default 50; `--items` each, default 20), applied at once with one
   `kubectl apply`. Per job: from its last result stored (the largest `recorded_at` of its rows in
   `mljob_results`: the collector's insert time, Postgres's clock) until a watch on the MLJobs sees
   `status.phase` Succeeded (this machine's clock: the same one), and until the terminal row in
   `mljob_jobs` (`completion_time`); p50 and p95. `status.completionTime` itself has a resolution
   of one second, too coarse for this. Also how long the J MLJobs took to reach `Running` with
   every task published (issue 8's goal: 1,000 MLJobs in 20 s).
2. C MLJobs (`--crash-jobs`, default 3) of one item each whose handler kills its worker process on
   every delivery (`os._exit(137)`; the supervisor starts the worker again), `maxDeliver: 2`,
   `ackWaitSeconds: 5` (the smallest allowed): JetStream gives up after the second delivery and
   publishes a MAX_DELIVERIES advisory. Per item: from the advisory's timestamp (NATS's clock)
   until the item's failed row (`recorded_at`), and the operator's own figure from its log
   ("... failed (MaxDeliveriesExceeded, N deliveries, X.XXXs after exhaustion)"). Beside it the
   original system's cutoff-based detection: an item idle for 10 minutes, checked every 15
   minutes, is found 10 to 25 minutes after it stopped.

    python -m bench.mljob_latency --jobs 50 --items 20 --workers 2 --crash-jobs 3 [--profile DIR]

`--profile DIR` attaches py-spy to the operator while the J small jobs run (many MLJobs at once)
and prints its top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import common, mljob_common

PIPELINE = "bench-mljob-latency"
HANDLER = "bench.handlers:noop_or_crash"
#: The operator's log line for an exhausted item (mljob/controller/exhausted.py).
FAILED_LINE = re.compile(
    r"item (?P<item>\S+) failed \(MaxDeliveriesExceeded, (?P<n>\d+) deliveries, "
    r"(?P<s>[0-9.]+)s after exhaustion\)"
)
#: The original system: an item idle for 10 minutes is failed by a check every 15 minutes.
ORIGINAL_IDLE_SECONDS = 600
ORIGINAL_CHECK_SECONDS = 900


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# ---------------------------------------------------------------------- advisories
class Advisories:
    """MAX_DELIVERIES advisories as NATS publishes them, with their arrival time, from a
    connection in a thread of its own (the stack's admin identity when it has one: an observer's
    subscription, not one of mljob's roles)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, Any]] = []
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="advisories", daemon=True
        )

    def __enter__(self) -> Advisories:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _main(self) -> None:
        import nats

        from mljob import protocol
        from mljob.controller.exhausted import parse_advisory
        from mljob.settings import NatsSettings
        from mljob.transport import natsconn

        kwargs = natsconn.options(NatsSettings(), name=f"bench-advisories-{os.getpid()}")
        if os.environ.get("MLJOB_DEV_NATS_ADMIN_USER"):
            kwargs["user"] = os.environ["MLJOB_DEV_NATS_ADMIN_USER"]
            kwargs["password"] = os.environ.get("MLJOB_DEV_NATS_ADMIN_PASSWORD", "")

        async def on_advisory(msg: Any) -> None:
            self.seen.append((time.time(), parse_advisory(msg.data)))

        try:
            nc = await nats.connect(**kwargs)
            await nc.subscribe(protocol.MAX_DELIVERIES_ADVISORY_SUBJECTS, cb=on_advisory)
            await nc.flush()
        except Exception as err:  # the log's figure still stands
            self.error = err
            self._ready.set()
            return
        self._ready.set()
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
        await nc.close()


# ---------------------------------------------------------------------- one run
@dataclass
class Latencies:
    workers: int
    jobs: int
    items: int
    #: per job: last result stored → the watch saw Succeeded / → the terminal row in Postgres
    to_status: list[float] = field(default_factory=list)
    to_row: list[float] = field(default_factory=list)
    #: per job: created → terminal (the whole small job)
    turnaround: list[float] = field(default_factory=list)
    #: the J MLJobs: from the `kubectl apply` starting / the first one created, to the last one Running
    all_running_from_apply: float = 0.0
    all_running_from_created: float = 0.0
    phases: dict[str, int] = field(default_factory=dict)
    #: per crash item: advisory timestamp → failed row; the operator's logged figure; deliveries
    crash_to_row: list[float] = field(default_factory=list)
    crash_logged: list[float] = field(default_factory=list)
    crash_deliveries: list[int] = field(default_factory=list)
    worker_crashes: int = 0
    #: apiserver requests while the J jobs ran ("VERB resource[/subresource]" -> count)
    requests: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def small_jobs(
    run: mljob_common.Session, watch: mljob_common.JobWatch, args: argparse.Namespace, out: Latencies
) -> None:
    names = [f"lat-{i:03d}" for i in range(args.jobs)]
    docs = [
        mljob_common.mljob(name, PIPELINE, items=[f"{name}-item-{j:03d}" for j in range(args.items)])
        for name in names
    ]
    profiler = None
    if args.profile:
        assert run.operator is not None
        group = f"latency-{out.workers}w-operator"
        profiler = mljob_common.Profiler(run.operator.pid, Path(args.profile), group)
    requests = mljob_common.apiserver_requests(run.stack)
    began = time.monotonic()
    mljob_common.apply(run.stack, run.namespace, docs)
    timeout = common.stage_timeout(args.jobs * args.items, floor=300)
    try:
        jobs = watch.wait(names, "terminal", timeout)
    finally:
        if profiler is not None:
            profiler.stop()
    time.sleep(1.0)  # the Events and Postgres writes that follow a terminal status
    out.requests = mljob_common.requests_between(requests, mljob_common.apiserver_requests(run.stack))
    watch.wait(names, "dispatched", 10)
    created = [j.created[1] for j in jobs if j.created]
    running = [j.dispatched[1] for j in jobs if j.dispatched]
    out.all_running_from_apply = max(running) - began
    out.all_running_from_created = max(running) - min(created)
    for j in jobs:
        out.phases[j.phase] = out.phases.get(j.phase, 0) + 1
    uids = [j.uid for j in jobs]
    with run.pg() as pg:
        stored = dict(
            pg.execute(
                "SELECT job_uid, extract(epoch FROM max(recorded_at))::float8 FROM mljob_results "
                "WHERE job_uid = ANY(%s) GROUP BY job_uid",
                (uids,),
            ).fetchall()
        )
        finished = dict(
            pg.execute(
                "SELECT uid, extract(epoch FROM completion_time)::float8 FROM mljob_jobs WHERE uid = ANY(%s)",
                (uids,),
            ).fetchall()
        )
    for j in jobs:
        last = stored.get(j.uid)
        if last is None or j.terminal is None or j.created is None:
            out.notes.append(f"{j.name}: no result rows")
            continue
        out.to_status.append(j.terminal[0] - last)
        if finished.get(j.uid) is not None:
            out.to_row.append(finished[j.uid] - last)
        out.turnaround.append(j.terminal[1] - j.created[1])


def crash_jobs(
    run: mljob_common.Session, watch: mljob_common.JobWatch, args: argparse.Namespace, out: Latencies
) -> None:
    names = [f"crash-{i:02d}" for i in range(args.crash_jobs)]
    docs = [
        mljob_common.mljob(
            name,
            PIPELINE,
            items=[f"{name}-item"],
            params={"crash_items": [f"{name}-item"]},
            maxDeliver=2,
            ackWaitSeconds=5,
        )
        for name in names
    ]
    with Advisories() as advisories:
        mljob_common.apply(run.stack, run.namespace, docs)
        jobs = watch.wait(names, "terminal", 180)
        time.sleep(0.5)  # the advisory subscription has had every advisory by now
    if advisories.error is not None:
        out.notes.append(f"advisories not observed ({advisories.error}); the operator's log figures only")
    by_uid = {j.uid: j for j in jobs}
    stamps: dict[str, float] = {}
    for _, advisory in advisories.seen:
        job = advisory.job
        if job is not None and job[1] in by_uid and advisory.timestamp is not None:
            stamps[job[1]] = advisory.timestamp.timestamp()
            out.crash_deliveries.append(advisory.deliveries)
    with run.pg() as pg:
        rows = pg.execute(
            "SELECT job_uid, extract(epoch FROM recorded_at)::float8 FROM mljob_results "
            "WHERE job_uid = ANY(%s) AND outcome = 'failed'",
            (list(by_uid),),
        ).fetchall()
    for uid, recorded in rows:
        if uid in stamps:
            out.crash_to_row.append(recorded - stamps[uid])
    if len(rows) != len(names):
        out.notes.append(f"{len(rows)} of {len(names)} crash items have a failed row")
    assert run.operator is not None
    crash_items = {f"{n}-item" for n in names}
    for match in FAILED_LINE.finditer(run.operator.log_text()):
        if match["item"] in crash_items:
            out.crash_logged.append(float(match["s"]))
    state = run.log_dir / f"{run.label}-supervisor.json"
    if state.exists():
        out.worker_crashes = int(json.loads(state.read_text()).get("crashes", 0))


def measure(stack: common.BenchStack, args: argparse.Namespace, workers: int, logs: Path) -> Latencies:
    out = Latencies(workers=workers, jobs=args.jobs, items=args.items)
    with mljob_common.session(stack, logs, f"latency{workers}w") as run:
        run.start_operator()
        worker_logs = logs / f"latency{workers}w-workers"
        worker_logs.mkdir(parents=True, exist_ok=True)
        run.start_supervised_workers(PIPELINE, HANDLER, workers, worker_logs)
        for i in range(1, workers + 1):  # the supervisor's log names: worker-<n>.log from 1
            path = worker_logs / f"worker-{i}.log"
            common.wait_until(
                lambda p=path: p.exists() and "serving pipeline" in p.read_text(errors="replace"),  # type: ignore[misc]
                60,
                f"worker {i} to serve",
                interval=0.1,
            )
        with mljob_common.JobWatch(stack, run.namespace) as watch:
            run.warm_up(watch, PIPELINE, "terminal")
            if args.jobs:
                small_jobs(run, watch, args, out)
            if args.crash_jobs:
                crash_jobs(run, watch, args, out)
            run.check_alive()
    return out


# ---------------------------------------------------------------------- tables
def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread(label: str, samples: Sequence[float], goal: str = "-", digits: int = 3) -> list[str]:
    """One table row: how many samples, their p50, p95 and max."""
    return [
        label,
        str(len(samples)),
        _s(percentile(samples, 50), digits),
        _s(percentile(samples, 95), digits),
        _s(max(samples, default=None), digits),
        goal,
    ]


def report(runs: Sequence[Latencies]) -> str:
    text = []
    rows = []
    for r in runs:
        rows.append(
            _spread(f"last result stored → MLJob shows Succeeded ({r.workers}w)", r.to_status, "p95 ≤ 2 s")
        )
        rows.append(_spread(f"last result stored → terminal row in Postgres ({r.workers}w)", r.to_row))
        rows.append(_spread(f"MLJob created → Succeeded, whole job ({r.workers}w)", r.turnaround, digits=2))
    if any(r.jobs for r in runs):
        first = runs[0]
        text.append(
            f"#### {first.jobs} MLJobs of {first.items} items applied at once (one `kubectl apply`), seconds"
        )
        text.append(common.markdown_table(["measure", "jobs", "p50", "p95", "max", "goal"], rows))
        running = [
            [
                str(r.workers),
                str(r.jobs),
                _s(r.all_running_from_apply, 2),
                _s(r.all_running_from_created, 2),
                f"{r.jobs / r.all_running_from_apply:.1f}" if r.all_running_from_apply else "-",
                ", ".join(f"{n} {p}" for p, n in sorted(r.phases.items())),
            ]
            for r in runs
        ]
        text.append(
            common.markdown_table(
                [
                    "workers",
                    "MLJobs",
                    "apply → all Running s",
                    "first created → all Running s",
                    "MLJobs/s to Running (goal 1,000 in 20 s: 50/s)",
                    "phases",
                ],
                running,
            )
        )
    for r in runs:
        if r.requests and r.jobs:
            rows = [[k, f"{n:,}", f"{n / r.jobs:.1f}"] for k, n in r.requests.items()]
            text.append(
                f"apiserver requests while the {r.jobs} MLJobs ran ({r.workers}w; the `kubectl apply` "
                "included, watches and lists left out):"
            )
            text.append(common.markdown_table(["request", "count", "per MLJob"], rows))
    crash_rows = []
    for r in runs:
        if not (r.crash_to_row or r.crash_logged):
            continue
        crash_rows.append(
            [
                f"MAX_DELIVERIES advisory → failed row ({r.workers}w)",
                ", ".join(_s(v) for v in sorted(r.crash_to_row)) or "-",
                _s(max(r.crash_to_row, default=None)),
                "≤ 5 s",
            ]
        )
        crash_rows.append(
            [
                f"the operator's own figure, from its log ({r.workers}w)",
                ", ".join(_s(v) for v in sorted(r.crash_logged)) or "-",
                _s(max(r.crash_logged, default=None)),
                "≤ 5 s",
            ]
        )
    if crash_rows:
        lo, hi = ORIGINAL_IDLE_SECONDS, ORIGINAL_IDLE_SECONDS + ORIGINAL_CHECK_SECONDS
        crash_rows.append(
            [
                "original system: 10 min idle cutoff, checked every 15 min",
                f"{lo:,} to {hi:,} (10 to 25 min)",
                f"{hi:,}",
                "-",
            ]
        )
        r = next(r for r in runs if r.crash_to_row or r.crash_logged)
        deliveries = ", ".join(str(d) for d in sorted(set(r.crash_deliveries))) or "?"
        text.append(
            f"#### An item that kills its worker on every delivery (maxDeliver 2, ackWaitSeconds 5; "
            f"deliveries in the advisories: {deliveries}; worker crashes: {r.worker_crashes}), seconds"
        )
        text.append(common.markdown_table(["measure", "per item", "max", "goal"], crash_rows))
    for r in runs:
        text.extend(f"- note ({r.workers}w): {n}" for n in r.notes)
    return "\n\n".join(text)


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=20, workers="2")
    for action in p._actions:  # here --items counts the items of each small job
        if action.dest == "items":
            action.help = "items per small MLJob (default 20)"
        if action.dest == "repeat":
            action.help = "runs per worker count; their samples are pooled (all Running: the first run's)"
    p.add_argument("--jobs", type=int, default=50, help="small MLJobs applied at once (default 50)")
    p.add_argument("--crash-jobs", type=int, default=3, help="one-item MLJobs whose item crashes its worker")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="profile the operator with py-spy while the small jobs run; raw profiles go to DIR",
    )
    p.add_argument(
        "--log-dir", help="where the operator's and workers' logs go (default: a new temporary directory)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs = mljob_common.log_dir(args, "bench-mljob-latency")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    with common.local_stack(args) as stack:
        description = common.machine(stack)
        mljob_common.install_crds(stack)
        runs = []
        for k in args.workers:
            pooled = measure(stack, args, k, logs)
            for _ in range(max(1, args.repeat) - 1):  # repeats pool their samples
                more = measure(stack, args, k, logs)
                for name in ("to_status", "to_row", "turnaround", "crash_to_row", "crash_logged"):
                    getattr(pooled, name).extend(getattr(more, name))
                pooled.crash_deliveries.extend(more.crash_deliveries)
                pooled.worker_crashes += more.worker_crashes
                pooled.notes.extend(more.notes)
            runs.append(pooled)
    title = "### Latencies of mljob: last result → terminal status, crashing item → failed row"
    text = [description, title, report(runs)]
    if args.profile:
        text.append("(profiled run: py-spy was attached to the operator while the small jobs ran)")
        text.extend(mljob_common.profile_report())
    print("\n\n".join(text))
    common.append_json(args.json_path, "latency", [r.__dict__ for r in runs])
    print(f"logs: {logs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
