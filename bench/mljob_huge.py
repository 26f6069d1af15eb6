"""One huge MLJob: N items from a URL manifest, K workers, apply → Succeeded, and what it costs in memory.

Issue 8's goal 4: one MLJob of 1,000,000 items from `spec.itemsFrom.url` completes with exact
counts, and the operator's memory grows by what the items themselves need once, no more (it
streams the manifest). The benchmark writes a JSON-lines manifest of N items (the other
benchmarks' items, `{"id": ..., "uri": ...}`, about 70 bytes a line) to a temporary file, serves
it over HTTP on a loopback port from a thread, and applies one MLJob with `itemsFrom: {url,
sha256}`. The operator (`mljob operator --namespace <ns>`, the collector in-process, or
`mljob collector` as its own process with `--separate-collector`) and K `mljob worker`s with the
no-op handler (bench/handlers.py) run it to `Succeeded`; the run fails unless `processed ==
total == N` and `failed == 0` in the status, and Postgres holds N `succeeded` rows of the job.

Measured, from the watch seeing the MLJob created: seconds to the first chunk published (the
items loaded, registered in Postgres and Redis), to `Running` (every task published) and to
`Succeeded`. Sampled every 0.5 s from just before the apply until `Succeeded`: the resident
memory (RSS, with children) of the operator, the collector and each worker, and of nats-server;
Redis `used_memory` (INFO memory); the bytes and messages of the pipeline's task stream and of
the results stream (the NATS monitor's `jsz`). Before the apply, after a one-item warm-up job:
each one's baseline. The operator's RSS when the watch saw the first chunk published, `Running`
and `Succeeded`. At the end: the Postgres size (`pg_total_relation_size`) of `mljob_items` and
`mljob_results` in the run's schema. "Items once" is what the operator must hold anyway: N item dicts as
`mljob.core.items` builds them (`sys.getsizeof` of the dict and its values, keys shared, plus the
list's pointer), estimated from a sample of the manifest's lines.

    python -m bench.mljob_huge --items 1000000 --workers 2
    python -m bench.mljob_huge --scale 100000,1000000 --workers 2   # growth per item at two sizes
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mljob import protocol
from mljob.core.items import normalise

from . import common, memory, mljob_common

PIPELINE = "bench-mljob-huge"
TASK_STREAM = protocol.task_stream(PIPELINE)
HANDLER = "bench.handlers:noop"
MIB = 2**20


# ---------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class Manifest:
    path: Path
    items: int
    size: int
    sha256: str


def write_manifest(directory: Path, items: int) -> Manifest:
    """N JSON lines, the other benchmarks' items; hashed as they are written."""
    path = directory / f"manifest-{items}.jsonl"
    digest = hashlib.sha256()
    size = 0
    with path.open("wb") as out:
        for start in range(0, items, 10_000):
            block = "".join(
                json.dumps(common.item(i), separators=(",", ":")) + "\n"
                for i in range(start, min(items, start + 10_000))
            ).encode()
            digest.update(block)
            size += len(block)
            out.write(block)
    return Manifest(path, items, size, digest.hexdigest())


@contextlib.contextmanager
def serve(manifest: Manifest) -> Iterator[str]:
    """The manifest over HTTP on a loopback port (a thread of this process); yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/jsonl")
            self.send_header("Content-Length", str(manifest.size))
            self.end_headers()
            with manifest.path.open("rb") as body:
                shutil.copyfileobj(body, self.wfile, 1 << 16)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="manifest-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{manifest.path.name}"
    finally:
        server.shutdown()
        server.server_close()


def item_bytes(manifest: Manifest, samples: int = 1000) -> float:
    """Bytes per item the operator holds at least: the item dict as mljob builds it from a line,
    its values and a list slot (keys are shared between items, so not counted)."""
    step = max(1, manifest.items // samples)
    total = count = 0
    with manifest.path.open("rb") as lines:
        for number, line in enumerate(lines):
            if number % step:
                continue
            item = normalise(json.loads(line), "sample")
            total += 8 + sys.getsizeof(item) + sum(sys.getsizeof(v) for v in item.values())
            count += 1
    return total / max(1, count)


# ---------------------------------------------------------------------- one run
@dataclass
class Measured:
    run: common.Run
    manifest_bytes: int
    item_bytes: float
    before: dict[str, int]
    peaks: dict[str, int]
    #: seconds from the MLJob's creation to each process's peak RSS
    peak_seconds: dict[str, float]
    #: milestone -> (seconds from the MLJob's creation, the operator's RSS then)
    timeline: dict[str, tuple[float | None, int | None]] = field(default_factory=dict)
    tables: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    @property
    def items(self) -> int:
        return self.run.items

    def growth(self, name: str) -> int:
        return self.peaks.get(name, 0) - self.before.get(name, 0)


def check_counts(run: mljob_common.Session, job: mljob_common.JobTimes, items: int) -> None:
    """Exact counts in the status and in Postgres, or BenchError."""
    status = job.status
    counts = tuple(int(status.get(k) or 0) for k in ("total", "processed", "failed"))
    if job.phase != "Succeeded" or counts != (items, items, 0):
        raise common.BenchError(f"the MLJob ended {job.phase}, total/processed/failed {counts}: {status}")
    with run.pg() as pg:
        rows = pg.execute(
            "SELECT outcome, count(*) FROM mljob_results WHERE job_uid = %s GROUP BY outcome", (job.uid,)
        ).fetchall()
    if dict(rows) != {"succeeded": items}:
        raise common.BenchError(f"mljob_results of the job: {dict(rows)}, not {items} succeeded")


def table_sizes(run: mljob_common.Session) -> dict[str, int]:
    with run.pg() as pg:
        return {
            table: int(pg.execute("SELECT pg_total_relation_size(%s::regclass)", (table,)).fetchone()[0])
            for table in ("mljob_items", "mljob_results")
        }


def measure(
    stack: common.BenchStack, args: argparse.Namespace, manifest: Manifest, url: str, workers: int, logs: Path
) -> Measured:
    name = f"huge-{uuid.uuid4().hex[:6]}"
    label = f"huge-{manifest.items // 1000}k-{workers}w"
    extra = {"MLJOB_RUN_COLLECTOR": "false"} if args.separate_collector else {}
    with mljob_common.session(stack, logs, label) as run:
        procs = {"operator": run.start_operator(**extra).pid}
        if args.separate_collector:
            procs["collector"] = run.start_collector().pid
        workers_started = run.start_workers(PIPELINE, HANDLER, workers)
        procs.update({f"worker {i + 1}": p.pid for i, p in enumerate(workers_started)})
        with mljob_common.JobWatch(stack, run.namespace) as watch:
            run.wait_serving(workers_started)
            run.warm_up(watch, PIPELINE, "terminal")
            roles = {"operator": [procs["operator"]], "workers": [p.pid for p in workers_started]}
            if args.separate_collector:
                roles["collector"] = [procs["collector"]]
            sampler = memory.Sampler(stack, procs, follow="operator")
            before = memory.baseline(sampler)
            meter = common.meter(stack, roles)
            meter.start()
            source = {"url": url, "sha256": manifest.sha256}
            with sampler:
                mljob_common.apply(
                    stack, run.namespace, [mljob_common.mljob(name, PIPELINE, itemsFrom=source)]
                )
                try:
                    job = watch.wait([name], "terminal", common.stage_timeout(manifest.items))[0]
                except common.BenchError:
                    run.check_alive()
                    raise
            cpu = meter.stop()
        check_counts(run, job, manifest.items)
        tables = table_sizes(run)
    assert job.created is not None and job.dispatched is not None and job.terminal is not None
    moments = {"first chunk published": job.first_chunk, "Running": job.dispatched, "Succeeded": job.terminal}
    timeline: dict[str, tuple[float | None, int | None]] = {
        label: (t[1] - job.created[1], sampler.rss_at(t[1])) if t else (None, None)
        for label, t in moments.items()
    }
    result = common.Run(
        benchmark="huge",
        system=f"mljob, {manifest.items:,} items from a URL",
        items=manifest.items,
        seconds=job.terminal[1] - job.created[1],
        cpu=cpu,
        workers=workers,
        dispatch_seconds=job.dispatched[1] - job.created[1],
    )
    return Measured(
        run=result,
        manifest_bytes=manifest.size,
        item_bytes=item_bytes(manifest),
        before=before,
        peaks=dict(sampler.peaks),
        peak_seconds={k: t - job.created[1] for k, t in sampler.peak_at.items()},
        timeline=timeline,
        tables=tables,
        samples=sampler.samples,
    )


# ---------------------------------------------------------------------- tables
def _mib(value: float | None) -> str:
    return common.fmt(None if value is None else value / MIB, 1)


def process_table(m: Measured) -> str:
    """Each process: RSS before the job, at its peak, the growth and the growth per item."""
    rows = []
    for name in [k for k in m.before if k == "operator" or k.startswith(("worker", "collector"))]:
        growth = m.growth(name)
        rows.append(
            [
                name,
                _mib(m.before.get(name)),
                _mib(m.peaks.get(name)),
                _mib(growth),
                common.fmt(growth / m.items, 0),
                common.fmt(m.peak_seconds.get(name), 1),
            ]
        )
    headers = ["process", "RSS before MiB", "peak MiB", "growth MiB", "growth bytes/item", "peak at s"]
    return common.markdown_table(headers, rows)


def timeline_table(runs: Sequence[Measured]) -> str:
    """Seconds from apply to each milestone and the operator's RSS then; its peak."""
    labels = list(runs[0].timeline) if runs else []
    rows = []
    for m in runs:
        row = [common.fmt(m.items), common.fmt(m.run.workers), _mib(m.before.get("operator"))]
        for label in labels:
            seconds, rss = m.timeline[label]
            row += [common.fmt(seconds, 1), _mib(rss)]
        rows.append([*row, _mib(m.peaks.get("operator")), common.fmt(m.peak_seconds.get("operator"), 1)])
    headers = ["items", "workers", "operator RSS before MiB"]
    for label in labels:
        headers += [f"→ {label} s", "RSS MiB"]
    return common.markdown_table([*headers, "peak MiB", "peak at s"], rows)


def growth_table(runs: Sequence[Measured]) -> str:
    """The operator's growth against the items themselves, at each size."""
    rows = []
    for m in runs:
        once = m.item_bytes * m.items
        growth = m.growth("operator")
        rows.append(
            [
                common.fmt(m.items),
                _mib(m.manifest_bytes),
                _mib(once),
                common.fmt(m.item_bytes, 0),
                _mib(growth),
                common.fmt(growth / m.items, 0),
                f"{growth / once:.2f}",
            ]
        )
    headers = [
        "items",
        "manifest MiB",
        "items once MiB",
        "items once bytes/item",
        "operator growth MiB",
        "growth bytes/item",
        "growth / items once",
    ]
    return common.markdown_table(headers, rows)


def services_table(runs: Sequence[Measured]) -> str:
    rows = []
    for m in runs:
        rows.append(
            [
                common.fmt(m.items),
                _mib(m.before.get("redis")),
                _mib(m.peaks.get("redis")),
                common.fmt(m.growth("redis") / m.items, 0),
                _mib(m.before.get("nats-server")),
                _mib(m.peaks.get("nats-server")),
                _mib(m.tables.get("mljob_items")),
                _mib(m.tables.get("mljob_results")),
                _mib(m.peaks.get(f"stream:{TASK_STREAM}")),
                common.fmt(m.peaks.get(f"messages:{TASK_STREAM}")),
                _mib(m.peaks.get("stream:MLJOB_RESULTS")),
                common.fmt(m.peaks.get("messages:MLJOB_RESULTS")),
            ]
        )
    headers = [
        "items",
        "Redis before MiB",
        "Redis peak MiB",
        "Redis bytes/item",
        "nats-server RSS before MiB",
        "peak MiB",
        "PG mljob_items MiB",
        "PG mljob_results MiB",
        "NATS task stream peak MiB",
        "messages",
        "NATS results stream peak MiB",
        "messages",
    ]
    return common.markdown_table(headers, rows)


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=1_000_000, workers="2")
    p.add_argument(
        "--scale",
        type=common.int_list,
        help="item counts, comma-separated: one run each (e.g. 100000,1000000; instead of --items)",
    )
    p.add_argument(
        "--separate-collector",
        action="store_true",
        help="run `mljob collector` as its own process (its memory apart from the operator's)",
    )
    p.add_argument(
        "--log-dir", help="where the operator's and workers' logs go (default: a new temporary directory)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = args.scale or [args.items]
    logs = mljob_common.log_dir(args, "bench-mljob-huge")
    measured: list[Measured] = []
    with common.local_stack(args) as stack, tempfile.TemporaryDirectory(prefix="bench-huge-") as tmp:
        description = common.machine(stack)
        mljob_common.install_crds(stack)
        for items in sizes:
            manifest = write_manifest(Path(tmp), items)
            with serve(manifest) as url:
                for k in args.workers:
                    runs = [measure(stack, args, manifest, url, k, logs) for _ in range(max(1, args.repeat))]
                    middle = common.median_run([m.run for m in runs])
                    measured.append(next(m for m in runs if m.run is middle))
            os.unlink(manifest.path)
    collector = "`mljob collector` apart" if args.separate_collector else "the collector in-process"
    title = f"One MLJob from a URL manifest, no-op handler, {collector}"
    text = [description, common.report(title, [m.run for m in measured], args.json_path)]
    text.append(
        "#### From apply to each milestone, and the operator's RSS then\n\n" + timeline_table(measured)
    )
    for m in measured:
        text.append(
            f"#### Memory, {m.items:,} items, {m.run.workers} workers "
            f"(RSS with children, sampled every {memory.SAMPLE_SECONDS} s: {m.samples} samples)\n\n"
            + process_table(m)
        )
    text.append("#### The operator's growth against the items themselves\n\n" + growth_table(measured))
    text.append(
        "#### Services (Redis and NATS sampled peaks; Postgres at the end)\n\n" + services_table(measured)
    )
    text.append(
        '"items once": N item dicts as mljob.core.items builds them (sys.getsizeof of the dict and its '
        "values, keys shared, plus a list slot). Growth: peak RSS minus the RSS before the apply, after a "
        "one-item warm-up job."
    )
    print("\n\n".join(text))
    print(f"logs: {logs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
