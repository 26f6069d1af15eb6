"""Many MLJobs at once: how fast they reach Running, and what they cost the operator once idle.

For each scale N (`--jobs`, default 100,1000,10000), on a namespace, schema and key prefix of its
own, with the operator running (`mljob operator --namespace <ns>`, collector in-process) and no
worker (so every job stays Running, its tasks waiting; `stallTimeoutSeconds` is set high enough
that no stall is reported while measuring):

1. **Ramp**: N small MLJobs (`--items` inline items each, default 5) are created at once by 16
   client threads. From the first one a watch saw created until all are `Running` with every task
   published: MLJobs per second (goal: 1,000 in 20 s), the operator's CPU per MLJob and the
   apiserver requests per MLJob (the creates left out).
2. **Steady state**: after `--settle` seconds (default 150: the quiet loops have backed off),
   for `--idle` seconds (default 60): the operator's CPU (cores), its resident memory at the end
   and against before the ramp (per MLJob), the CPU of NATS, Redis, Postgres and the apiserver,
   and every apiserver write in that window (goal: none for an idle job). Goals at 10,000: at
   most 0.3 core and 600 MB.
3. The MLJobs are deleted through the operator (cleanup of each job's consumer, keys and registry
   entry), timed, at scales up to `--delete-up-to` (1,000); larger ones are torn down without it.

Per-MLJob figures that stay flat or fall from 100 to 10,000 mean the cost grows at most linearly.

    python -m bench.mljob_many --jobs 100,1000,10000 [--items 5] [--idle 60] [--profile DIR]

`--profile DIR` attaches py-spy to the operator during the ramp and during the idle window.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from mljob.api.models import GROUP, PLURAL, VERSION

from . import common, mljob_common

PIPELINE = "bench-mljob-many"
#: No stall may be reported while the jobs sit idle (the default is 600 s).
STALL_TIMEOUT_SECONDS = 86_400
CREATE_THREADS = 16
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")


@dataclass
class Scale:
    """One scale's figures."""

    jobs: int
    items: int
    create_seconds: float = 0.0
    #: first created -> all Running, and from the first create request
    to_running: float = 0.0
    to_running_from_create: float = 0.0
    ramp_cpu: dict[str, float] = field(default_factory=dict)
    ramp_requests: dict[str, int] = field(default_factory=dict)
    idle_seconds: float = 0.0
    idle_cpu: dict[str, float] = field(default_factory=dict)
    idle_requests: dict[str, int] = field(default_factory=dict)
    rss_before: int = 0
    rss_idle: int = 0
    delete_seconds: float | None = None

    @property
    def per_second(self) -> float:
        return self.jobs / self.to_running if self.to_running > 0 else float("inf")

    @property
    def idle_writes(self) -> int:
        return sum(n for key, n in self.idle_requests.items() if key.split(" ", 1)[0] in WRITE_VERBS)


def create_all(stack: common.BenchStack, namespace: str, docs: Sequence[dict[str, Any]]) -> float:
    """Create the MLJobs from CREATE_THREADS threads (what `kubectl apply` of many users looks
    like to the apiserver); returns the seconds it took."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.config import new_client_from_config

    client = new_client_from_config(config_file=stack.env["KUBECONFIG"])
    client.configuration.connection_pool_maxsize = CREATE_THREADS
    api = CustomObjectsApi(client)
    began = time.monotonic()
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(
            pool.map(
                lambda doc: api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc), docs
            )
        )
    return time.monotonic() - began


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


def tear_down(run: mljob_common.Session, jobs: int) -> None:
    """Without the operator, quickly: its finalizers removed and the MLJobs deleted (16 client
    threads), the pipeline's task stream (every job consumer with it), registry entries and the
    session's Redis keys removed. Deleting ten thousand through the operator takes a long while
    (measured at the smaller scales)."""
    import asyncio

    from kubernetes.client import CustomObjectsApi
    from kubernetes.config import new_client_from_config

    assert run.operator is not None
    run.operator.stop()
    client = new_client_from_config(config_file=run.stack.env["KUBECONFIG"])
    client.configuration.connection_pool_maxsize = CREATE_THREADS
    api = CustomObjectsApi(client)
    unblock = {"metadata": {"finalizers": None}}
    names = [f"many-{i:05d}" for i in range(jobs)]

    def drop(name: str) -> None:
        api.patch_namespaced_custom_object(GROUP, VERSION, run.namespace, PLURAL, name, unblock)
        api.delete_namespaced_custom_object(GROUP, VERSION, run.namespace, PLURAL, name)

    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(drop, names))
    asyncio.run(_drop_nats_and_redis(run))


async def _drop_nats_and_redis(run: mljob_common.Session) -> None:
    from mljob import protocol
    from mljob.adapters import jetstream

    nc = await common.nats_connect("bench-many-teardown")
    try:
        js = nc.jetstream()
        registry = await jetstream.registry(js, 1)
        for key in await registry.keys():
            if key.startswith(f"{PIPELINE}."):
                await registry.purge(key)
        await js.delete_stream(protocol.task_stream(PIPELINE))
    finally:
        await nc.close()
    import redis

    client = redis.Redis.from_url(run.stack.env["MLJOB_REDIS_URL"])
    keys = list(client.scan_iter(match=f"{run.prefix}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    client.close()


def requests_since(stack: common.BenchStack, before: dict[str, int]) -> dict[str, int]:
    return mljob_common.requests_between(before, mljob_common.apiserver_requests(stack))


def profiler(args: argparse.Namespace, pid: int, group: str) -> mljob_common.Profiler | None:
    return mljob_common.Profiler(pid, Path(args.profile), group) if args.profile else None


def measure(stack: common.BenchStack, args: argparse.Namespace, jobs: int, logs: Path) -> Scale:
    out = Scale(jobs=jobs, items=args.items)
    names = [f"many-{i:05d}" for i in range(jobs)]
    docs = [
        mljob_common.mljob(
            name,
            PIPELINE,
            items=[f"{name}-{j}" for j in range(args.items)],
            stallTimeoutSeconds=STALL_TIMEOUT_SECONDS,
        )
        for name in names
    ]
    with mljob_common.session(stack, logs, f"many{jobs}") as run:
        operator = run.start_operator()
        with mljob_common.JobWatch(stack, run.namespace) as watch:
            run.warm_up(watch, PIPELINE, "dispatched")
            process = psutil.Process(operator.pid)
            out.rss_before = process.memory_info().rss
            roles = {"operator": [operator.pid]}
            meter = common.meter(stack, roles)
            requests = mljob_common.apiserver_requests(stack)
            prof = profiler(args, operator.pid, f"many{jobs}-ramp-operator")
            meter.start()
            began = time.monotonic()
            out.create_seconds = create_all(stack, run.namespace, docs)
            times = watch.wait(names, "dispatched", max(120.0, jobs * 0.5))
            out.ramp_cpu = meter.stop()
            if prof is not None:
                prof.stop()
            out.ramp_requests = requests_since(stack, requests)
            out.ramp_requests.pop("POST mljobs", None)  # the creates themselves
            created = min(t.created[1] for t in times if t.created)
            running = max(t.dispatched[1] for t in times if t.dispatched)
            out.to_running, out.to_running_from_create = running - created, running - began
            run.check_alive()

            time.sleep(args.settle)
            meter = common.meter(stack, roles)
            requests = mljob_common.apiserver_requests(stack)
            prof = profiler(args, operator.pid, f"many{jobs}-idle-operator")
            meter.start()
            window = time.monotonic()
            time.sleep(args.idle)
            out.idle_cpu = meter.stop()
            out.idle_seconds = time.monotonic() - window
            if prof is not None:
                prof.stop()
            out.idle_requests = requests_since(stack, requests)
            out.rss_idle = process.memory_info().rss
            phases = {t.phase for t in watch.wait(names, "dispatched", 10)}
            if phases != {"Running"}:
                raise common.BenchError(f"after the idle window the MLJobs are {sorted(phases)}, not Running")
            run.check_alive()
            if jobs <= args.delete_up_to:
                out.delete_seconds = delete_all(run, timeout=max(300.0, jobs * 0.5))
            else:
                tear_down(run, jobs)
    return out


# ---------------------------------------------------------------------- tables
def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def report(scales: Sequence[Scale]) -> str:
    ramp = common.markdown_table(
        [
            "MLJobs",
            "created in s",
            "created → all Running s",
            "MLJobs/s to Running",
            "first create → all Running s",
            "operator CPU ms per MLJob",
            "apiserver requests per MLJob",
        ],
        [
            [
                f"{s.jobs:,}",
                f"{s.create_seconds:.1f}",
                f"{s.to_running:.1f}",
                f"{s.per_second:.1f}",
                f"{s.to_running_from_create:.1f}",
                f"{s.ramp_cpu.get('operator', 0) * 1000 / s.jobs:.1f}",
                f"{sum(s.ramp_requests.values()) / s.jobs:.1f}",
            ]
            for s in scales
        ],
    )
    kinds = sorted({k for s in scales for k in s.ramp_requests})
    requests = common.markdown_table(
        ["MLJobs", *kinds],
        [[f"{s.jobs:,}", *(f"{s.ramp_requests.get(k, 0) / s.jobs:.2f}" for k in kinds)] for s in scales],
    )
    components = ["operator", "nats", "redis", "postgres", "apiserver", "etcd"]
    idle = common.markdown_table(
        [
            "MLJobs",
            "window s",
            *(f"{c} cores" for c in components),
            "operator cores per 1,000 MLJobs",
            "operator RSS MB",
            "RSS growth KB per MLJob",
            "apiserver writes in the window",
        ],
        [
            [
                f"{s.jobs:,}",
                f"{s.idle_seconds:.0f}",
                *(f"{s.idle_cpu.get(c, 0) / s.idle_seconds:.3f}" for c in components),
                f"{s.idle_cpu.get('operator', 0) / s.idle_seconds * 1000 / s.jobs:.3f}",
                _mb(s.rss_idle),
                f"{(s.rss_idle - s.rss_before) / 1024 / s.jobs:.1f}",
                f"{s.idle_writes} ({', '.join(f'{k} {n}' for k, n in s.idle_requests.items()) or 'none'})",
            ]
            for s in scales
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
    return "\n\n".join(
        [
            f"Ramp: N MLJobs of {scales[0].items} inline items created at once ({CREATE_THREADS} client "
            "threads), no workers:",
            ramp,
            "apiserver requests per MLJob during the ramp, by verb and resource (the creates left out):",
            requests,
            "Steady state: every MLJob Running, nothing moving (goal at 10,000: operator ≤ 0.3 core, "
            "≤ 600 MB, no apiserver write):",
            idle,
            deletes,
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=5, workers=None)
    for action in p._actions:
        if action.dest == "items":
            action.help = "inline items per MLJob (default 5)"
    p.add_argument("--jobs", type=common.int_list, default=[100, 1000, 10000], help="scales: MLJobs at once")
    p.add_argument(
        "--settle",
        type=float,
        default=150.0,
        help="seconds between all Running and the window (a quiet job's loop backs off to "
        "MLJOB_IDLE_RECONCILE_INTERVAL, 60 s, within about 135 s)",
    )
    p.add_argument("--idle", type=float, default=60.0, help="seconds of the steady-state window")
    p.add_argument(
        "--delete-up-to",
        type=int,
        default=1000,
        help="scales up to this many MLJobs are deleted through the operator, timed (default 1,000); "
        "larger ones are torn down without it",
    )
    p.add_argument("--profile", metavar="DIR", help="py-spy on the operator during the ramp and the window")
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
        scales = [measure(stack, args, jobs, logs) for jobs in args.jobs]
    text = [description, "### Many MLJobs: to Running, and idle", report(scales)]
    if args.profile:
        text.extend(mljob_common.profile_report())
    print("\n\n".join(text))
    common.append_json(args.json_path, "many", [s.__dict__ for s in scales])
    print(f"logs: {logs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
