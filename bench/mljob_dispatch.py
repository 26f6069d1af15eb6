"""Dispatch with mljob: one MLJob of N items from ConfigMaps or a URL, `kubectl apply` → Running.

The operator (`mljob operator --namespace <ns>`, the stack's operator identity, the collector
in-process) is running and idle; the item ConfigMaps exist (or, with `--source url`, a JSON-lines
manifest is served on a loopback port, as bench/mljob_huge.py serves it). The clock runs from the moment a
watch sees the MLJob created until it sees it `Running` with `status.dispatchCursor == total`
(every task published and acknowledged by JetStream, the cursor written). In the same run, on the
same stack, the dispatch baselines: `publish_async` + one wait, and one awaited `js.publish` per
message (bench/baseline_dispatch.py), each over the same number of mljob-sized tasks (the
awaited row only up to 100,000 tasks: at a round trip each, a million would take many minutes
and say nothing new). No worker runs: only dispatch is measured. The operator's CPU includes its
idle collector. The goal (issue 13): mljob at least 0.8 of the raw `publish_async` row, and its
cost per item flat from 20,000 to 1,000,000 items.

    python -m bench.mljob_dispatch --items 100000 [--profile DIR]
    python -m bench.mljob_dispatch --items 1000000 --source url

`--profile DIR` attaches py-spy to the operator for the measured interval and prints its top
functions (figures of a profiled run are slower: compare them with nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import uuid
from pathlib import Path

from . import baseline_dispatch, common, mljob_common, mljob_huge

PIPELINE = "bench-mljob-dispatch"
MLJOB = "mljob: apply → Running"
#: The goal of issue 13: mljob's dispatch / the raw publish_async row, items per second.
GOAL = 0.8
#: Above this many tasks the awaited-publish row is left out (a round trip per task).
AWAITED_UP_TO = 100_000


#: mljob runs of this process: (seconds to the first chunk's cursor, items in it, seconds after
#: it, items of the job)
SPLITS: list[tuple[float, int, float, int]] = []
#: mljob runs of this process: apiserver requests from apply to Running (watches and lists left out)
REQUESTS: list[dict[str, int]] = []


def measure(
    stack: common.BenchStack, args: argparse.Namespace, logs: Path, source: dict[str, str] | None
) -> common.Run:
    name = f"dispatch-{uuid.uuid4().hex[:6]}"
    with mljob_common.session(stack, logs, "dispatch") as run:
        operator = run.start_operator()
        with mljob_common.JobWatch(stack, run.namespace) as watch:
            run.warm_up(watch, PIPELINE, "dispatched")
            roles = {"operator": [operator.pid]}
            job, cpu, requests = run.timed_job(
                watch, name, PIPELINE, args.items, "dispatched", roles, args.profile, items_from=source
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
    """mljob against each baseline, with the goal of issue 13 (≥ 0.8 of the raw publish_async row)."""
    ours = runs[MLJOB].items_per_second
    raw = ours / runs[baseline_dispatch.PUBLISH_ASYNC].items_per_second
    rows = [
        [
            f"mljob / {baseline_dispatch.PUBLISH_ASYNC}",
            f"{raw:.2f}",
            f"≥ {GOAL}: {'met' if raw >= GOAL else 'missed'}",
        ]
    ]
    if baseline_dispatch.AWAITED in runs:
        awaited = ours / runs[baseline_dispatch.AWAITED].items_per_second
        rows.append([f"mljob / {baseline_dispatch.AWAITED}", f"{awaited:.2f}", "-"])
    per_item = [[name, f"{1e6 / run.items_per_second:.1f}"] for name, run in runs.items()]
    return (
        common.markdown_table(["ratio (items/s)", "this run", "goal"], rows)
        + "\n\nwall-clock µs per item (flat from 20,000 to 1,000,000 items is the goal):\n\n"
        + common.markdown_table(["system", "µs per item"], per_item)
    )


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=100_000, workers=None)
    p.add_argument(
        "--profile", metavar="DIR", help="profile the operator with py-spy; raw profiles go to DIR"
    )
    p.add_argument("--log-dir", help="where the operator's log goes (default: a new temporary directory)")
    p.add_argument(
        "--source",
        choices=["configmaps", "url"],
        default="configmaps",
        help="where the MLJob's items come from: ConfigMaps (default) or a served JSON-lines manifest",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    logs = mljob_common.log_dir(args, "bench-mljob-dispatch")
    modes = [
        m for m in baseline_dispatch.MODES if m != baseline_dispatch.AWAITED or args.items <= AWAITED_UP_TO
    ]
    with contextlib.ExitStack() as scope:
        stack = scope.enter_context(common.local_stack(args))
        source = None
        if args.source == "url":
            folder = Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="bench-dispatch-")))
            manifest = mljob_huge.write_manifest(folder, args.items)
            source = {"url": scope.enter_context(mljob_huge.serve(manifest)), "sha256": manifest.sha256}
        description = common.machine(stack)
        mljob_common.install_crds(stack)
        runs: dict[str, list[common.Run]] = {mode: [] for mode in (*modes, MLJOB)}
        for _ in range(max(1, args.repeat)):  # alternate, so drift hits every system alike
            for mode in modes:
                runs[mode].append(asyncio.run(baseline_dispatch.measure(stack, mode, args.items)))
            runs[MLJOB].append(measure(stack, args, logs, source))
        shown = {mode: common.median_run(r) for mode, r in runs.items()}
    runs_each = "one run each" if args.repeat <= 1 else f"median of {args.repeat} runs each"
    origin = "a URL manifest" if args.source == "url" else "ConfigMaps"
    title = (
        f"Dispatch, mljob against the baselines: {args.items:,} tasks from {origin}, {runs_each}, same stack"
    )
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
