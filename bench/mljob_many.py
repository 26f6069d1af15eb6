"""Many MLJobs at once: how fast they reach Running, what they cost once idle, a restart, the end.

For each scale N (`--jobs`, default 100,1000,10000; 100000 can be given), on a namespace, schema
and key prefix of its own, with the operator running (`mljob operator --namespace <ns>`, collector
in-process, its Prometheus `/metrics` on a free port) and no worker (so every job stays Running,
its tasks waiting; `stallTimeoutSeconds` is set high enough that no stall is reported):

1. **Ramp**: N small MLJobs (`--items` inline items each, default 5) are created at once by 16
   client threads. From the first one a watch saw created until all are `Running` with every task
   published: MLJobs per second (goal: 1,000 in 20 s), the CPU of the operator, the apiserver and
   etcd per MLJob (the latter two serve the creates too), their peak RSS (sampled every 0.5 s),
   and the apiserver requests per MLJob from the first create to all Running, by verb and
   resource (the apiserver's own `apiserver_request_total`, for MLJobs, Events and ConfigMaps;
   watches and lists left out: the benchmark's watch lists; the creates themselves left out).
   Nothing else writes meanwhile, so these are the operator's requests.
2. **Steady state**: after `--settle` seconds (default 150: the quiet loops have backed off),
   for `--idle` seconds (default 60): the cores of the operator, NATS, Redis, Postgres, the
   apiserver and etcd; the RSS of the operator, the apiserver and etcd (process trees) at the end
   against before the ramp (growth per MLJob); every apiserver write in that window (goal: none
   for an idle job). Goals at 10,000: at most 0.3 core and 600 MB for the operator.
3. **Restart** (`--restart`, on by default): with all N MLJobs Running and idle, the operator is
   stopped (SIGTERM to its process group, SIGKILL after 15 s; the stop is timed) and started
   again. Measured from the new process's start (just before it is spawned) until it is
   reconciling all N jobs, defined observably: the sum over phases of its `mljob_jobs` gauge (a
   job counts once its loop finished a first reconcile: `JOBS.track` per uid) reaches N on its
   `/metrics`. Also: when `/metrics` first answered (start-up: imports, connecting the stores),
   the reconcile ticks it counted by then (`mljob_reconcile_duration_seconds_count`) per MLJob,
   and the apiserver requests per MLJob from the stop until all reconciled. The restart is only
   measured if the first operator's gauge showed the N jobs (else the report says why not).
   Goal: within 60 s at 10,000.
4. **Running → terminal**: `spec.cancel: true` is patched onto a sample of the jobs (the first
   `--terminal-sample`, default 1,000, at most N: the report says how many), 16 client threads
   again; measured until the watch saw every one of them `Cancelled` (or another terminal phase)
   plus 3 s for trailing writes (the Events after the status): the apiserver requests per
   cancelled MLJob by verb and resource. The apiserver's counters do not say who sent a request,
   so the benchmark's own patches (exactly one `PATCH mljobs` per cancelled job, its only write)
   are subtracted from `PATCH mljobs`; what is left is the operator's. The other N - sample jobs
   stay Running and idle in that window (their idle writes: the steady-state table).
5. The MLJobs are deleted through the operator (cleanup of each job's consumer, keys and registry
   entry; the cancelled sample too), timed, at scales up to `--delete-up-to` (1,000); larger ones
   are torn down without it.

A stage that fails (the ramp timing out, a create refused by the apiserver or etcd, the operator
dying, a restart that never reconciles all) ends that scale: the failure is recorded as its first
limit reached (the stage, the error, and the apiserver's and etcd's RSS then, or that one is no
longer running), the jobs are torn down without the operator and the next scale runs; the report
lists each scale's limit. The ramp's time-out is `--ramp-timeout` (default: N/5 s, at least
120 s: slower than 5 MLJobs/s counts as a limit; issue 8's 10,000 took 530 s).

Per-MLJob figures that stay flat or fall from 100 to 10,000 mean the cost grows at most linearly.

    python -m bench.mljob_many --jobs 100,1000,10000 [--items 5] [--settle 150] [--idle 60]
        [--no-restart] [--terminal-sample 1000] [--profile DIR]

`--profile DIR` attaches py-spy to the operator during the ramp and during the idle window
(`--profile-rate`, 200 samples a second by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mljob.api.models import GROUP, PLURAL, VERSION

from . import common, mljob_common, wire
from .memory import tree_rss

PIPELINE = "bench-mljob-many"
#: No stall may be reported while the jobs sit idle (the default is 600 s).
STALL_TIMEOUT_SECONDS = 86_400
CREATE_THREADS = 16
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
#: The job registry's JetStream KV bucket (docs/protocol.md: part of the wire contract).
REGISTRY_BUCKET = "mljob-registry"
#: Processes whose RSS is followed: the operator and the apiserver with its store.
RSS_COMPONENTS = ("operator", "apiserver", "etcd")
CPU_COMPONENTS = ("operator", "nats", "redis", "postgres", "apiserver", "etcd")
#: After the last cancelled job is terminal: time for the writes that follow its status.
TRAIL_SECONDS = 3.0
#: The benchmark's own request per cancelled job, subtracted from the count.
CANCEL_REQUEST = "PATCH mljobs"


@dataclass
class Scale:
    """One scale's figures; None: not measured (a stage failed before, or it was switched off)."""

    jobs: int
    items: int
    #: the stage running now, and the first limit reached ("<stage>: <error>") if one ended the scale
    stage: str = "start"
    limit: str | None = None
    create_seconds: float | None = None
    #: first created -> all Running, and from the first create request
    to_running: float | None = None
    to_running_from_create: float | None = None
    ramp_cpu: dict[str, float] = field(default_factory=dict)
    ramp_requests: dict[str, int] = field(default_factory=dict)
    idle_seconds: float | None = None
    idle_cpu: dict[str, float] = field(default_factory=dict)
    idle_requests: dict[str, int] = field(default_factory=dict)
    #: RSS bytes of RSS_COMPONENTS before the ramp, at its peak during it, at the end of the window
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_ramp_peak: dict[str, int] = field(default_factory=dict)
    rss_idle: dict[str, int] = field(default_factory=dict)
    #: why the restart was not measured (None: measured, or not asked for)
    restart_note: str | None = None
    stop_seconds: float | None = None
    #: from spawning the new operator: its /metrics first answered, and it tracked all N jobs
    restart_served: float | None = None
    restart_seconds: float | None = None
    restart_ticks: float | None = None
    restart_requests: dict[str, int] = field(default_factory=dict)
    rss_restarted: int | None = None
    terminal_jobs: int = 0
    cancel_seconds: float | None = None
    #: first cancel patch sent -> the last sampled job terminal
    to_terminal: float | None = None
    terminal_cpu: dict[str, float] = field(default_factory=dict)
    #: the operator's requests (the benchmark's patches subtracted)
    terminal_requests: dict[str, int] = field(default_factory=dict)
    terminal_phases: dict[str, int] = field(default_factory=dict)
    delete_seconds: float | None = None

    @property
    def per_second(self) -> float | None:
        if self.to_running is None:
            return None
        return self.jobs / self.to_running if self.to_running > 0 else float("inf")

    @property
    def idle_writes(self) -> int:
        return sum(n for key, n in self.idle_requests.items() if key.split(" ", 1)[0] in WRITE_VERBS)


# ---------------------------------------------------------------------- client threads
def custom_objects(stack: common.BenchStack) -> Any:
    """A CustomObjectsApi whose pool serves CREATE_THREADS threads."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.config import new_client_from_config

    client = new_client_from_config(config_file=stack.env["KUBECONFIG"])
    client.configuration.connection_pool_maxsize = CREATE_THREADS
    return CustomObjectsApi(client)


def in_threads(call: Callable[[Any], object], args: Iterable[Any]) -> float:
    """`call` on each of `args` from CREATE_THREADS threads (what `kubectl apply` of many users
    looks like to the apiserver); the seconds it took. The first error is raised."""
    began = time.monotonic()
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(call, args))
    return time.monotonic() - began


def create_all(stack: common.BenchStack, namespace: str, docs: Sequence[dict[str, Any]]) -> float:
    api = custom_objects(stack)
    return in_threads(
        lambda doc: api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc), docs
    )


def cancel_all(stack: common.BenchStack, namespace: str, names: Sequence[str]) -> float:
    """`spec.cancel: true` on each MLJob, one merge patch each (what `kubectl patch` sends)."""
    api = custom_objects(stack)
    body = {"spec": {"cancel": True}}
    return in_threads(
        lambda name: api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body), names
    )


def delete_all(run: mljob_common.Session, timeout: float) -> float:
    """Delete every MLJob of the session and wait until the last is gone (the operator cleans
    each up and removes its finalizer); seconds. Polls a LIST: `kubectl delete --wait` waits for
    one object after the other, and with thousands it, not the operator, sets the pace."""
    began = time.monotonic()
    mljob_common.kubectl(run.stack, "-n", run.namespace, "delete", PLURAL, "--all", "--wait=false")

    def gone() -> bool:
        try:
            listed = mljob_common.kubectl(run.stack, "-n", run.namespace, "get", PLURAL, "-o", "name")
        except common.BenchError:  # an apiserver busy with thousands of deletions may time out
            return False
        return not listed.stdout.strip()

    common.wait_until(gone, timeout, "every MLJob to be deleted", interval=1.0)
    return time.monotonic() - began


def tear_down(run: mljob_common.Session, names: Sequence[str]) -> None:
    """Without the operator, quickly: its finalizers removed and the MLJobs deleted (16 client
    threads; ones never created are skipped), the pipeline's task stream (every job consumer with
    it), registry entries and the session's Redis keys removed. Deleting ten thousand through the
    operator takes a long while (measured at the smaller scales); after a failure it may not run."""
    from kubernetes.client.exceptions import ApiException

    if run.operator is not None:
        run.operator.stop()
    api = custom_objects(run.stack)
    unblock = {"metadata": {"finalizers": None}}

    def drop(name: str) -> None:
        try:
            api.patch_namespaced_custom_object(GROUP, VERSION, run.namespace, PLURAL, name, unblock)
            api.delete_namespaced_custom_object(GROUP, VERSION, run.namespace, PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise

    in_threads(drop, names)
    asyncio.run(_drop_nats_and_redis(run))


async def _drop_nats_and_redis(run: mljob_common.Session) -> None:
    from nats.js.errors import BucketNotFoundError

    nc = await common.nats_connect("bench-many-teardown")
    try:
        js = nc.jetstream()
        with contextlib.suppress(BucketNotFoundError):
            registry = await js.key_value(REGISTRY_BUCKET)
            for key in await _keys(registry):
                if key.startswith(f"{PIPELINE}."):
                    await registry.purge(key)
        await wire.delete_pipeline_stream(js, PIPELINE)
    finally:
        await nc.close()
    import redis
    from redis.cluster import RedisCluster

    url = run.stack.env["MLJOB_REDIS_URL"]
    # On a Redis Cluster (`--ha`) a multi-key DEL must stay in one slot: the cluster client scans
    # every primary and splits the DEL by slot.
    clustered = run.stack.env.get("MLJOB_REDIS_CLUSTER", "").lower() in ("1", "true", "yes")
    client: Any = RedisCluster.from_url(url) if clustered else redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{run.prefix}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    client.close()


async def _keys(registry: Any) -> list[str]:
    from nats.js.errors import NoKeysError

    try:
        return list(await registry.keys())
    except NoKeysError:
        return []


# ---------------------------------------------------------------------- observing
def requests_since(stack: common.BenchStack, before: dict[str, int]) -> dict[str, int]:
    return mljob_common.requests_between(before, mljob_common.apiserver_requests(stack))


def profiler(args: argparse.Namespace, pid: int, group: str) -> mljob_common.Profiler | None:
    if not args.profile:
        return None
    return mljob_common.Profiler(pid, Path(args.profile), group, rate=args.profile_rate)


def free_port() -> int:
    """A TCP port free right now, for the operator's /metrics (sessions never share one)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Scrape:
    """What the operator's /metrics says: jobs tracked (the `mljob_jobs` gauge summed over
    phases) and reconcile ticks so far (the reconcile histogram's counts summed over actions)."""

    jobs: int
    ticks: float


def scrape(port: int) -> Scrape | None:
    """The operator's /metrics now; None while it does not answer (starting, or gone)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:  # refused while starting, reset, timed out
        return None
    jobs = ticks = 0.0
    for line in text.splitlines():
        if line.startswith("mljob_jobs{"):
            jobs += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mljob_reconcile_duration_seconds_count{"):
            ticks += float(line.rsplit(" ", 1)[1])
    return Scrape(jobs=int(jobs), ticks=ticks)


def rss_pids(stack: common.BenchStack, operator: int) -> dict[str, int]:
    services = stack.service_pids()
    return {"operator": operator, **{c: services[c] for c in RSS_COMPONENTS if c in services}}


class PeakRss:
    """The peak RSS of each named process tree, sampled every 0.5 s in a thread (a burst shorter
    than that can be missed: a lower bound)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks.get(name, 0), tree_rss(pid))
            if self._stop.wait(0.5):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def services_state(stack: common.BenchStack) -> str:
    """The apiserver's and etcd's RSS, or that one is gone: whether a failure was theirs."""
    shown = []
    for name, pid in stack.service_pids().items():
        if name in RSS_COMPONENTS:
            rss = tree_rss(pid)
            shown.append(f"{name} RSS {_mb(rss)} MB" if rss else f"{name} not running")
    return ", ".join(shown)


def one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


# ---------------------------------------------------------------------- one scale
def measure(stack: common.BenchStack, args: argparse.Namespace, jobs: int, logs: Path) -> Scale:
    """One scale's stages; a failing stage is recorded as the scale's limit, not raised."""
    out = Scale(jobs=jobs, items=args.items)
    names = [f"many-{i:06d}" for i in range(jobs)]
    with mljob_common.session(stack, logs, f"many{jobs}") as run:
        try:
            _stages(run, args, out, names)
        except Exception as err:
            out.limit = f"{out.stage}: {one_line(err)} [{services_state(stack)}]"
            print(f"[many {jobs:,}] stopped at {out.limit}", file=sys.stderr)
            if run.operator is not None:
                print(f"----- {run.operator.name} (last lines)\n{run.operator.log_tail()}", file=sys.stderr)
            try:
                tear_down(run, names)
            except Exception as cleanup:
                print(f"[many {jobs:,}] tear-down failed too: {one_line(cleanup)}", file=sys.stderr)
    return out


def _stages(run: mljob_common.Session, args: argparse.Namespace, out: Scale, names: list[str]) -> None:
    stack, jobs = run.stack, out.jobs
    docs = [
        mljob_common.mljob(
            name,
            PIPELINE,
            items=[f"{name}-{j}" for j in range(args.items)],
            stallTimeoutSeconds=STALL_TIMEOUT_SECONDS,
        )
        for name in names
    ]
    port = free_port()
    operator = run.start_operator(MLJOB_METRICS_PORT=str(port))
    with mljob_common.JobWatch(stack, run.namespace) as watch:
        run.warm_up(watch, PIPELINE, "dispatched")

        out.stage = "ramp"
        out.rss_before = {name: tree_rss(pid) for name, pid in rss_pids(stack, operator.pid).items()}
        roles = {"operator": [operator.pid]}
        meter = common.meter(stack, roles)
        requests = mljob_common.apiserver_requests(stack)
        prof = profiler(args, operator.pid, f"many{jobs}-ramp-operator")
        if prof is not None:
            run.profilers.append(prof)
        timeout = args.ramp_timeout or max(120.0, jobs / 5)
        with PeakRss(rss_pids(stack, operator.pid)) as peak:
            meter.start()
            began = time.monotonic()
            out.stage = "ramp (creating the MLJobs)"
            out.create_seconds = create_all(stack, run.namespace, docs)
            out.stage = "ramp (waiting for all Running)"
            times = watch.wait(names, "dispatched", max(1.0, timeout - (time.monotonic() - began)))
            out.ramp_cpu = meter.stop()
        out.rss_ramp_peak = peak.peaks
        if prof is not None:
            prof.stop()
        out.ramp_requests = requests_since(stack, requests)
        out.ramp_requests.pop("POST mljobs", None)  # the creates themselves
        created = min(t.created[1] for t in times if t.created)
        running = max(t.dispatched[1] for t in times if t.dispatched)
        out.to_running, out.to_running_from_create = running - created, running - began
        run.check_alive()

        out.stage = "steady state"
        time.sleep(args.settle)
        meter = common.meter(stack, roles)
        requests = mljob_common.apiserver_requests(stack)
        prof = profiler(args, operator.pid, f"many{jobs}-idle-operator")
        if prof is not None:
            run.profilers.append(prof)
        meter.start()
        window = time.monotonic()
        time.sleep(args.idle)
        out.idle_cpu = meter.stop()
        out.idle_seconds = time.monotonic() - window
        if prof is not None:
            prof.stop()
        out.idle_requests = requests_since(stack, requests)
        out.rss_idle = {name: tree_rss(pid) for name, pid in rss_pids(stack, operator.pid).items()}
        phases = {t.phase for t in watch.wait(names, "dispatched", 10)}
        if phases != {"Running"}:
            raise common.BenchError(f"after the idle window the MLJobs are {sorted(phases)}, not Running")
        run.check_alive()

        if args.restart:
            out.stage = "restart"
            restart(run, out, port)
            run.check_alive()

        sample = names[: min(jobs, args.terminal_sample)]
        if sample:
            out.stage = "Running → terminal"
            assert run.operator is not None
            to_terminal(run, watch, out, sample)
            run.check_alive()

    out.stage = "delete"
    if jobs <= args.delete_up_to:
        out.delete_seconds = delete_all(run, timeout=max(300.0, jobs * 0.5))
    else:
        tear_down(run, names)


def restart(run: mljob_common.Session, out: Scale, port: int) -> None:
    """Stop the operator, start it again, time until its gauge tracks every job (see the module
    docstring); skipped, with a note, when the first operator's gauge does not show them."""
    stack, jobs = run.stack, out.jobs
    assert run.operator is not None
    seen = scrape(port)
    if seen is None or seen.jobs < jobs:
        shown = "no answer" if seen is None else f"{seen.jobs:,} jobs"
        out.restart_note = f"the operator's mljob_jobs gauge did not track the {jobs:,} jobs ({shown})"
        return
    requests = mljob_common.apiserver_requests(stack)
    stopping = time.monotonic()
    run.operator.stop()
    out.stop_seconds = time.monotonic() - stopping
    began = time.monotonic()
    operator = run.relaunch_operator(MLJOB_METRICS_PORT=str(port))
    last: list[Scrape] = []

    def all_tracked() -> bool:
        now = scrape(port)
        if now is None:
            if not operator.alive():
                raise common.BenchError(f"the restarted operator exited:\n{operator.log_tail()}")
            return False
        if out.restart_served is None:
            out.restart_served = time.monotonic() - began
        last[:] = [now]
        return now.jobs >= jobs

    try:
        common.wait_until(
            all_tracked, max(120.0, jobs * 0.02), f"the restarted operator to track {jobs:,} jobs", 0.2
        )
    except common.BenchError as err:
        tracked = f" (it tracked {last[0].jobs:,})" if last else ""
        raise common.BenchError(f"{err}{tracked}") from err
    out.restart_seconds = time.monotonic() - began
    out.restart_ticks = last[0].ticks
    out.rss_restarted = tree_rss(operator.pid)
    out.restart_requests = requests_since(stack, requests)


def to_terminal(
    run: mljob_common.Session, watch: mljob_common.JobWatch, out: Scale, sample: list[str]
) -> None:
    """Cancel `sample` and count the operator's apiserver requests until all are terminal."""
    stack = run.stack
    assert run.operator is not None
    out.terminal_jobs = len(sample)
    meter = common.meter(stack, {"operator": [run.operator.pid]})
    requests = mljob_common.apiserver_requests(stack)
    meter.start()
    began = time.monotonic()
    out.cancel_seconds = cancel_all(stack, run.namespace, sample)
    times = watch.wait(sample, "terminal", max(120.0, len(sample) * 0.5))
    out.to_terminal = max(t.terminal[1] for t in times if t.terminal) - began
    time.sleep(TRAIL_SECONDS)
    out.terminal_cpu = meter.stop()
    counted = requests_since(stack, requests)
    mine = counted.pop(CANCEL_REQUEST, 0) - len(sample)
    if mine > 0:
        counted[CANCEL_REQUEST] = mine
    out.terminal_requests = dict(sorted(counted.items()))
    out.terminal_phases = dict(Counter(t.phase for t in times))


# ---------------------------------------------------------------------- tables
def _mb(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:,.0f}"


def _per(value: float | None, jobs: int, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale / jobs:,.{digits}f}"


def _by_kind(
    scales: Sequence[Scale], get: Callable[[Scale], Mapping[str, int]], per: Callable[[Scale], int]
) -> str:
    kinds = sorted({k for s in scales for k in get(s)})
    rows = [[f"{s.jobs:,}", *(f"{get(s).get(k, 0) / per(s):.2f}" for k in kinds)] for s in scales if per(s)]
    return common.markdown_table(["MLJobs", *kinds], rows)


def report(scales: Sequence[Scale]) -> str:
    ramped = [s for s in scales if s.to_running is not None]
    ramp = common.markdown_table(
        [
            "MLJobs",
            "created in s",
            "created → all Running s",
            "MLJobs/s to Running",
            "first create → all Running s",
            "CPU ms per MLJob: operator",
            "apiserver",
            "etcd",
            "apiserver requests per MLJob apply → Running",
        ],
        [
            [
                f"{s.jobs:,}",
                common.fmt(s.create_seconds, 1),
                common.fmt(s.to_running, 1),
                common.fmt(s.per_second, 1),
                common.fmt(s.to_running_from_create, 1),
                *(_per(s.ramp_cpu.get(c), s.jobs, 1000) for c in ("operator", "apiserver", "etcd")),
                f"{sum(s.ramp_requests.values()) / s.jobs:.1f}",
            ]
            for s in ramped
        ],
    )
    idled = [s for s in scales if s.idle_seconds]
    idle_cpu = common.markdown_table(
        ["MLJobs", "window s", *(f"{c} cores" for c in CPU_COMPONENTS), "operator cores per 1,000 MLJobs"],
        [
            [
                f"{s.jobs:,}",
                f"{s.idle_seconds:.0f}",
                *(f"{s.idle_cpu.get(c, 0) / s.idle_seconds:.3f}" for c in CPU_COMPONENTS),
                f"{s.idle_cpu.get('operator', 0) / s.idle_seconds * 1000 / s.jobs:.3f}",
            ]
            for s in idled
            if s.idle_seconds
        ],
    )
    memory = common.markdown_table(
        [
            "MLJobs",
            *(f"{c} RSS MB idle (peak in ramp)" for c in RSS_COMPONENTS),
            *(f"{c} growth KB per MLJob" for c in RSS_COMPONENTS),
            "apiserver writes in the window",
        ],
        [
            [
                f"{s.jobs:,}",
                *(f"{_mb(s.rss_idle.get(c))} ({_mb(s.rss_ramp_peak.get(c))})" for c in RSS_COMPONENTS),
                *(
                    f"{(s.rss_idle.get(c, 0) - s.rss_before.get(c, 0)) / 1024 / s.jobs:.1f}"
                    for c in RSS_COMPONENTS
                ),
                f"{s.idle_writes} ({', '.join(f'{k} {n}' for k, n in s.idle_requests.items()) or 'none'})",
            ]
            for s in idled
        ],
    )
    restarted = [s for s in scales if s.restart_seconds is not None]
    restarts = common.markdown_table(
        [
            "MLJobs",
            "old operator stopped in s",
            "new one serves /metrics after s",
            "all MLJobs reconciled after s",
            "reconcile ticks per MLJob by then",
            "apiserver requests per MLJob (stop → all reconciled)",
            "operator RSS MB then",
        ],
        [
            [
                f"{s.jobs:,}",
                common.fmt(s.stop_seconds, 1),
                common.fmt(s.restart_served, 1),
                common.fmt(s.restart_seconds, 1),
                _per(s.restart_ticks, s.jobs, digits=2),
                f"{sum(s.restart_requests.values()) / s.jobs:.2f}",
                _mb(s.rss_restarted),
            ]
            for s in restarted
        ],
    )
    ended = [s for s in scales if s.to_terminal is not None]
    terminal = common.markdown_table(
        [
            "MLJobs",
            "cancelled",
            "patches sent in s",
            "first cancel → all terminal s",
            "phases",
            "operator CPU ms per cancelled MLJob",
            "operator's apiserver requests per cancelled MLJob",
        ],
        [
            [
                f"{s.jobs:,}",
                f"{s.terminal_jobs:,}",
                common.fmt(s.cancel_seconds, 1),
                common.fmt(s.to_terminal, 1),
                ", ".join(f"{p} {n}" for p, n in sorted(s.terminal_phases.items())),
                _per(s.terminal_cpu.get("operator"), s.terminal_jobs, 1000),
                f"{sum(s.terminal_requests.values()) / s.terminal_jobs:.2f}",
            ]
            for s in ended
        ],
    )
    deletes = common.markdown_table(
        ["MLJobs", "all deleted (cleanup included) in s", "MLJobs/s"],
        [
            [f"{s.jobs:,}", common.fmt(s.delete_seconds, 1), common.fmt(s.jobs / s.delete_seconds, 1)]
            for s in scales
            if s.delete_seconds
        ],
    )
    parts: list[str] = []
    if ramped:
        parts += [
            f"Ramp: N MLJobs of {scales[0].items} inline items created at once ({CREATE_THREADS} client "
            "threads), no workers:",
            ramp,
            "apiserver requests per MLJob from the first create to all Running, by verb and resource "
            "(MLJobs, Events, ConfigMaps; watches, lists and the creates left out):",
            _by_kind(ramped, lambda s: s.ramp_requests, lambda s: s.jobs),
        ]
    if idled:
        parts += [
            "Steady state: every MLJob Running, nothing moving (goal at 10,000: operator ≤ 0.3 core, "
            "≤ 600 MB, no apiserver write). CPU:",
            idle_cpu,
            "Memory (process trees' RSS; growth: end of the window against before the ramp) and the "
            "apiserver's writes in the window:",
            memory,
        ]
    if restarted:
        parts += [
            "Operator restart with every MLJob Running and idle (SIGTERM, then a new process): from "
            "spawning it until its `mljob_jobs` gauge tracks all N (each job reconciled once; goal: "
            "≤ 60 s at 10,000):",
            restarts,
        ]
    parts += [
        f"- {s.jobs:,} MLJobs: restart not measured: {s.restart_note}" for s in scales if s.restart_note
    ]
    if ended:
        parts += [
            "Running → terminal: `spec.cancel: true` patched onto the first min(N, --terminal-sample) "
            "MLJobs; the operator's apiserver requests from the first patch until all of them are "
            f"terminal (+{TRAIL_SECONDS:.0f} s), the benchmark's one `{CANCEL_REQUEST}` per job "
            "subtracted (the apiserver's counters do not say who sent a request); the other jobs "
            "stayed idle meanwhile:",
            terminal,
            "The operator's apiserver requests per cancelled MLJob, by verb and resource:",
            _by_kind(ended, lambda s: s.terminal_requests, lambda s: s.terminal_jobs),
        ]
    if any(s.delete_seconds for s in scales):
        parts += ["Deletion through the operator (the cancelled jobs included):", deletes]
    parts.append(
        "First limit reached, per scale:\n\n"
        + "\n".join(f"- {s.jobs:,} MLJobs: {s.limit or 'none, every stage ran'}" for s in scales)
    )
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=5, workers=None)
    for action in p._actions:
        if action.dest == "items":
            action.help = "inline items per MLJob (default 5)"
    p.add_argument(
        "--jobs",
        type=common.int_list,
        default=[100, 1000, 10000],
        help="scales: MLJobs at once (e.g. 100,1000)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=150.0,
        help="seconds between all Running and the window (a quiet job's loop backs off to "
        "MLJOB_IDLE_RECONCILE_INTERVAL, 60 s, within about 135 s)",
    )
    p.add_argument("--idle", type=float, default=60.0, help="seconds of the steady-state window")
    p.add_argument(
        "--ramp-timeout",
        type=float,
        default=None,
        help="seconds the ramp may take before it counts as the scale's limit (default: N/5, at least 120)",
    )
    p.add_argument(
        "--restart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restart the operator with all MLJobs idle and time until it reconciles all (default: on)",
    )
    p.add_argument(
        "--terminal-sample",
        type=int,
        default=1000,
        metavar="N",
        help="cancel this many MLJobs (at most all) and count the operator's requests to terminal; "
        "0: skip (default 1,000)",
    )
    p.add_argument(
        "--delete-up-to",
        type=int,
        default=1000,
        help="scales up to this many MLJobs are deleted through the operator, timed (default 1,000); "
        "larger ones are torn down without it",
    )
    p.add_argument("--profile", metavar="DIR", help="py-spy on the operator during the ramp and the window")
    p.add_argument(
        "--profile-rate",
        type=int,
        default=200,
        metavar="HZ",
        help="py-spy samples per second (default 200; py-spy itself then takes about a third of a "
        "core: lower it for a long ramp such as 100,000 MLJobs)",
    )
    p.add_argument("--log-dir", help="where the operator's logs go (default: a new temporary directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs = mljob_common.log_dir(args, "bench-mljob-many")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    with common.local_stack(args) as stack:
        description = common.machine(stack)
        mljob_common.install_crds(stack)
        scales = []
        for jobs in args.jobs:
            try:
                scales.append(measure(stack, args, jobs, logs))
            except Exception as err:  # setting the session up or closing it: still report the others
                scales.append(Scale(jobs=jobs, items=args.items, limit=f"session: {one_line(err)}"))
    text = [description, "### Many MLJobs: to Running, idle, restart, to terminal", report(scales)]
    if args.profile:
        text.extend(mljob_common.profile_report())
    print("\n\n".join(text))
    common.append_json(args.json_path, "many", [s.__dict__ for s in scales])
    print(f"logs: {logs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
