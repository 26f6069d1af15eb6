"""Dispatch with mljob: one MLJob of N items from ConfigMaps, `kubectl apply` → Running.

The operator (`mljob operator --namespace <ns>`, the stack's operator identity, the collector
in-process) is running and idle; the item ConfigMaps exist. The clock runs from the moment a
watch sees the MLJob created until it sees it `Running` with `status.dispatchCursor == total`
(every task published and acknowledged by JetStream, the cursor written). In the same run, on the
same stack, the dispatch baselines: `publish_async` + one wait, and one awaited `js.publish` per
message (bench/baseline_dispatch.py), each over the same number of mljob-sized tasks. No worker
runs: only dispatch is measured. The operator's CPU includes its idle collector.

    python -m bench.mljob_dispatch --items 100000 [--profile DIR]

`--profile DIR` attaches py-spy to the operator for the measured interval and prints its top
functions (figures of a profiled run are slower: compare them with nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

from . import baseline_dispatch, common, mljob_common

PIPELINE = "bench-mljob-dispatch"
MLJOB = "mljob: apply → Running"


#: mljob runs of this process: (seconds to the first chunk's cursor, items in it, seconds after
#: it, items of the job)
SPLITS: list[tuple[float, int, float, int]] = []
#: mljob runs of this process: apiserver requests from apply to Running (watches and lists left out)
REQUESTS: list[dict[str, int]] = []


def measure(stack: common.BenchStack, args: argparse.Namespace, logs: Path) -> common.Run:
    name = f"dispatch-{uuid.uuid4().hex[:6]}"
    with mljob_common.session(stack, logs, "dispatch") as run:
        operator = run.start_operator()
        with mljob_common.JobWatch(stack, run.namespace) as watch:
            run.warm_up(watch, PIPELINE, "dispatched")
            job, cpu, requests = run.timed_job(
                watch, name, PIPELINE, args.items, "dispatched", {"operator": [operator.pid]}, args.profile
            )
            REQUESTS.append(requests)
        if int(job.status.get("total") or 0) != args.items:
            raise common.BenchError(f"the MLJob shows total {job.status.get('total')}, not {args.items}")
        assert job.created is not None and job.dispatched is not None
        if job.first_chunk is not None:
            first = job.first_chunk[1] - job.created[1]
            SPLITS.append((first, job.first_chunk[2], job.dispatched[1] - job.first_chunk[1], args.items))
    return common.Run(
        benchmark="dispatch",
        system=MLJOB,
        items=args.items,
        seconds=job.dispatched[1] - job.created[1],
        cpu=cpu,
    )


def splits() -> str:
    """Where mljob's dispatch time went: until the first chunk's cursor was written (kopf, the items
    read from the ConfigMaps, Postgres and Redis registration, stream, consumer, registry, the
    first chunk), and after it (the remaining chunks, each with its status write)."""
    rows = [
        [
            str(i),
            f"{first:.2f}",
            f"{cursor:,}",
            f"{rest:.2f}",
            f"{(total - cursor) / rest:,.0f}" if rest > 0 else "-",
        ]
        for i, (first, cursor, rest, total) in enumerate(SPLITS, 1)
    ]
    headers = ["mljob run", "created → first chunk s", "first chunk items", "after it s", "items/s after it"]
    asked = sorted({k for r in REQUESTS for k in r})
    counts = common.markdown_table(
        ["mljob run", *asked],
        [[str(i), *(str(r.get(k, 0)) for k in asked)] for i, r in enumerate(REQUESTS, 1)],
    )
    return (
        common.markdown_table(headers, rows)
        + "\n\napiserver requests from apply to Running (the apply included; watches, lists left out):\n\n"
        + counts
    )


def ratios(runs: dict[str, common.Run]) -> str:
    """mljob against each baseline, with the goal of issue 8 (≥ 0.8 of publish_async)."""
    ours = runs[MLJOB].items_per_second
    rows = [
        [
            "mljob / publish_async + one wait",
            f"{ours / runs[baseline_dispatch.PUBLISH_ASYNC].items_per_second:.2f}",
            "≥ 0.8",
        ],
        [
            "mljob / awaited js.publish per message",
            f"{ours / runs[baseline_dispatch.AWAITED].items_per_second:.2f}",
            "-",
        ],
    ]
    return common.markdown_table(["ratio (items/s)", "this run", "goal"], rows)


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=100_000, workers=None)
    p.add_argument(
        "--profile", metavar="DIR", help="profile the operator with py-spy; raw profiles go to DIR"
    )
    p.add_argument("--log-dir", help="where the operator's log goes (default: a new temporary directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    logs = mljob_common.log_dir(args, "bench-mljob-dispatch")
    with common.local_stack(args) as stack:
        description = common.machine(stack)
        mljob_common.install_crds(stack)
        runs: dict[str, list[common.Run]] = {mode: [] for mode in (*baseline_dispatch.MODES, MLJOB)}
        for _ in range(max(1, args.repeat)):  # alternate, so drift hits every system alike
            for mode in baseline_dispatch.MODES:
                runs[mode].append(asyncio.run(baseline_dispatch.measure(stack, mode, args.items)))
            runs[MLJOB].append(measure(stack, args, logs))
        shown = {mode: common.median_run(r) for mode, r in runs.items()}
    runs_each = "one run each" if args.repeat <= 1 else f"median of {args.repeat} runs each"
    title = f"Dispatch, mljob against the baselines: {args.items:,} tasks, {runs_each}, same stack"
    text = [description, common.report(title, list(shown.values()), args.json_path), ratios(shown), splits()]
    text.append(
        "mljob's clock: from the watch seeing the MLJob created to it seeing `Running` with "
        "`dispatchCursor == total`; `operator` includes the operator's idle in-process collector."
    )
    if args.profile:
        text.append("(profiled run: py-spy was attached to the operator; these figures are slower)")
        text.extend(mljob_common.profile_report())
    print("\n\n".join(text))
    print(f"logs: {logs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
