"""Faults at full size on the clustered stack: a 100,000-item job per fault, against the same job without one.

Issue 15's section 3 at the size it asks for (`tests/ha` runs each fault on 12,000 items, what
the suite's time allows). On the clustered stack (`mljob dev stack up --ha`), per fault, in a
namespace, schema and key prefix of its own: two operator replicas under leader election
(`--no-collector`), two `mljob collector`s, `--workers` workers with a sleeping handler
(`--handler-ms`, `--concurrency`), one MLJob of `--items` items from ConfigMaps. Once the job
has processed `--at` of its items the fault is injected; the clock runs from the MLJob's
creation to `Succeeded`. The baseline is the same job on the same stack in the same run with no
fault (`none`, always first): each fault's cost is its job's time over the baseline's.

After each job, exact or the run fails: phase Succeeded, `processed` = items and `failed` = 0 in
the status, one result row per item in Postgres (`count(*)` = `count(DISTINCT item_id)` =
items), the job row Succeeded.

Faults (`--faults`, comma-separated, default all):
- `nats-leader`: the server leading the pipeline's task stream SIGKILLed, back after 5 s;
- `consumer-lost`: the server holding the job's one-replica consumer SIGKILLed and kept down
  until the job ended (the operator replaces the consumer after MLJOB_CONSUMER_REPLACE_SECONDS,
  set to 20 s here);
- `redis-primary`: the Redis primary of the job's slot SIGKILLed; back (as a replica) once its
  replica was promoted;
- `postgres-primary`: the Postgres primary (its Patroni with it) SIGKILLed; back as a standby
  once the other was promoted;
- `operator`: the operator replica holding the Lease SIGKILLed;
- `all`: a NATS node, the Redis primary, the Postgres primary and the leading operator within
  ten seconds, as `tests/ha` does.

    python -m bench.mljob_faults --items 100000 [--faults nats-leader,operator] [--at 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import common, mljob_common

PIPELINE = "bench-faults"
HANDLER = "bench.handlers:sleep"
FAULTS = ("none", "nats-leader", "consumer-lost", "redis-primary", "postgres-primary", "operator", "all")
#: Short leases (the standby takes over in seconds), as tests/ha; a silent consumer replaced soon.
OPERATOR_ENV = {
    "MLJOB_LEASE_DURATION_SECONDS": "6",
    "MLJOB_RENEW_DEADLINE_SECONDS": "4",
    "MLJOB_RETRY_PERIOD_SECONDS": "1",
    "MLJOB_CONSUMER_REPLACE_SECONDS": "20",
}


@dataclass
class Outcome:
    fault: str
    seconds: float
    injected_at: int
    fault_seconds: float
    stored: int


class FaultRun:
    """One session of the fault benchmark: its operators, collectors and workers."""

    def __init__(
        self, stack: common.BenchStack, session: mljob_common.Session, args: argparse.Namespace
    ) -> None:
        self.stack, self.session, self.args = stack, session, args
        self.operators: list[mljob_common.Proc] = []

    def devstack(self) -> Any:
        from mljob_dev.devstack.stack import Stack

        return Stack.load(self.stack.directory)

    def wait_healthy(self, timeout: float = 300.0) -> None:
        """Every server whole again before the next job: the NATS cluster formed, the Postgres
        standby streaming (a second failover with the standby still catching up finds nothing to
        promote: the first run of `all` after `postgres-primary` timed out on exactly that)."""
        from mljob_dev.devstack import nats_cluster, postgres_ha

        nats_cluster.wait_formed(self.devstack(), timeout=timeout)
        deadline = time.monotonic() + timeout
        while postgres_ha.streaming(self.devstack()) < 1:
            if time.monotonic() > deadline:
                raise common.BenchError(f"the Postgres standby is not streaming after {timeout:.0f}s")
            time.sleep(1)

    def start(self) -> None:
        self.wait_healthy()
        run = self.session
        mljob_common.kubectl(self.stack, "create", "namespace", run.namespace)
        cmd = [
            sys.executable,
            *("-m", "mljob.cli.main", "operator", "--namespace", run.namespace),
            *("--leader-elect", "--no-collector", "--lease-namespace", run.namespace),
        ]
        for n in range(2):
            env = run.env(**OPERATOR_ENV)
            self.operators.append(mljob_common.Proc(f"{run.label}-operator-{n}", cmd, env, run.log_dir))
        run.operator = self.operators[0]  # the session deletes the MLJobs through it at the end
        for n in range(2):
            collector = [sys.executable, "-m", "mljob.cli.main", "collector"]
            run.workers.append(
                mljob_common.Proc(f"{run.label}-collector-{n}", collector, run.env("collector"), run.log_dir)
            )
        extra = {
            "BENCH_HANDLER_MS": f"{self.args.handler_ms:g}",
            "MLJOB_WORKER_CONCURRENCY": str(self.args.concurrency),
        }
        run.wait_serving(run.start_workers(PIPELINE, HANDLER, self.args.workers, **extra))

    def leader(self, timeout: float = 60.0) -> mljob_common.Proc:
        """The operator replica holding the Lease (its identity is host name and PID)."""
        host, deadline = socket.gethostname(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = mljob_common.kubectl(
                    self.stack, "-n", self.session.namespace, "get", "lease", "mljob-operator", "-o", "json"
                )
            except common.BenchError:
                got = None
            identity = json.loads(got.stdout).get("spec", {}).get("holderIdentity") if got else None
            for proc in self.operators:
                if proc.alive() and identity == f"{host}-{proc.pid}":
                    return proc
            time.sleep(0.5)
        raise common.BenchError("no operator replica holds the Lease")

    def status(self, name: str) -> dict[str, Any]:
        try:
            got = mljob_common.kubectl(
                self.stack, "-n", self.session.namespace, "get", mljob_common.PLURAL, name, "-o", "json"
            )
        except common.BenchError:
            return {}  # the apiserver busy: asked again
        return dict(json.loads(got.stdout).get("status") or {})

    def job(self, fault: str, inject: Callable[[str], Callable[[], None] | None]) -> Outcome:
        """One job of `--items` items with `fault` injected at `--at` of it; exact or BenchError."""
        name = f"faults-{fault}-{uuid.uuid4().hex[:4]}"
        maps, docs = mljob_common.configmaps(name, self.args.items)
        mljob_common.apply(self.stack, self.session.namespace, docs)
        with mljob_common.JobWatch(self.stack, self.session.namespace) as watch:
            mljob_common.apply(
                self.stack, self.session.namespace, [mljob_common.mljob(name, PIPELINE, config_maps=maps)]
            )
            uid = watch.wait([name], "created", 60)[0].uid
            threshold = int(self.args.items * self.args.at)
            injected_at, fault_seconds, after = 0, 0.0, None
            if fault != "none":
                deadline = time.monotonic() + common.stage_timeout(self.args.items)
                while (injected_at := int(self.status(name).get("processed") or 0)) < threshold:
                    if time.monotonic() > deadline:
                        raise common.BenchError(f"{name} never reached {threshold} processed")
                    time.sleep(0.5)
                began = time.monotonic()
                after = inject(uid)
                fault_seconds = time.monotonic() - began
            try:
                job = watch.wait([name], "terminal", common.stage_timeout(self.args.items) + 600)[0]
            finally:
                if after is not None:
                    after()
        return self.exact(job, fault, injected_at, fault_seconds)

    def exact(
        self, job: mljob_common.JobTimes, fault: str, injected_at: int, fault_seconds: float
    ) -> Outcome:
        items, status = self.args.items, job.status
        if (job.phase, int(status.get("processed") or 0), int(status.get("failed") or 0)) != (
            "Succeeded",
            items,
            0,
        ):
            raise common.BenchError(f"{fault}: the MLJob ended {job.phase}: {status}")
        with self.session.pg() as pg:
            rows, distinct = pg.execute(
                "SELECT count(*), count(DISTINCT item_id) FROM mljob_results WHERE job_uid = %s", (job.uid,)
            ).fetchone() or (0, 0)
            phase = pg.execute("SELECT phase FROM mljob_jobs WHERE uid = %s", (job.uid,)).fetchone()
        if (rows, distinct) != (items, items) or phase is None or phase[0] != "Succeeded":
            raise common.BenchError(
                f"{fault}: Postgres holds {rows} rows ({distinct} items), job row {phase}"
            )
        assert job.created is not None and job.terminal is not None
        return Outcome(fault, job.terminal[1] - job.created[1], injected_at, fault_seconds, int(rows))

    # ------------------------------------------------------------------ faults
    def inject(self, fault: str) -> Callable[[str], Callable[[], None] | None]:
        """The function that injects `fault` for a job uid; it returns what to do once the job
        ended (a node kept down brought back), or None."""
        from mljob import protocol
        from mljob_dev.devstack import nats_cluster, postgres_ha, redis_cluster

        def nats_leader(uid: str) -> None:
            stack = self.devstack()
            node = nats_cluster.node_of_server(stack, self.wait_leader(protocol.task_stream(PIPELINE)))
            nats_cluster.kill(stack, node)
            time.sleep(5)
            nats_cluster.start_node(self.devstack(), node)

        def consumer_lost(uid: str) -> Callable[[], None]:
            stack = self.devstack()
            node = nats_cluster.node_of_server(stack, self.consumer_server(uid))
            nats_cluster.kill(stack, node)

            def back() -> None:
                nats_cluster.start_node(self.devstack(), node)

            return back

        def redis_primary(uid: str) -> None:
            stack = self.devstack()
            primary = redis_cluster.primary_of(stack, f"{{{uid}}}")
            redis_cluster.kill(stack, primary)
            redis_cluster.wait_promoted(self.devstack(), primary)
            redis_cluster.start_node(self.devstack(), primary)

        def postgres_primary(uid: str) -> None:
            old = postgres_ha.primary(self.devstack())
            assert old is not None, "no Postgres primary"
            postgres_ha.kill_primary(self.devstack())
            postgres_ha.wait_primary(self.devstack(), other_than=old)
            postgres_ha.start_node(self.devstack(), old.n)

        def operator(uid: str) -> None:
            self.leader().popen.send_signal(signal.SIGKILL)

        def everything(uid: str) -> None:
            stack = self.devstack()
            nats_node = nats_cluster.node_of_server(stack, self.wait_leader(protocol.task_stream(PIPELINE)))
            primary = redis_cluster.primary_of(stack, f"{{{uid}}}")
            pg_old = postgres_ha.primary(stack)
            assert pg_old is not None, "no Postgres primary"
            nats_cluster.kill(stack, nats_node)
            time.sleep(2)
            redis_cluster.kill(stack, primary)
            time.sleep(2)
            postgres_ha.kill_primary(self.devstack())
            time.sleep(2)
            self.leader().popen.send_signal(signal.SIGKILL)
            time.sleep(4)
            nats_cluster.start_node(self.devstack(), nats_node)
            redis_cluster.wait_promoted(self.devstack(), primary)
            postgres_ha.wait_primary(self.devstack(), other_than=pg_old)
            redis_cluster.start_node(self.devstack(), primary)
            postgres_ha.start_node(self.devstack(), pg_old.n)

        chosen: dict[str, Callable[[str], Any]] = {
            "none": lambda uid: None,
            "nats-leader": nats_leader,
            "consumer-lost": consumer_lost,
            "redis-primary": redis_primary,
            "postgres-primary": postgres_primary,
            "operator": operator,
            "all": everything,
        }
        return chosen[fault]

    def wait_leader(self, stream: str, timeout: float = 60.0) -> str:
        from mljob_dev.devstack import nats_cluster

        deadline = time.monotonic() + timeout
        while not (leader := nats_cluster.stream_leader(self.devstack(), stream)):
            if time.monotonic() > deadline:
                raise common.BenchError(f"{stream} has no leader")
            time.sleep(0.5)
        return leader

    def consumer_server(self, uid: str) -> str:
        from mljob import protocol

        async def ask() -> str:
            nc = await common.nats_connect("bench-faults")
            try:
                info = await nc.jetstream().consumer_info(
                    protocol.task_stream(PIPELINE), protocol.task_consumer(uid)
                )
                assert info.cluster is not None and info.cluster.leader, info
                return str(info.cluster.leader)
            finally:
                await nc.close()

        return asyncio.run(ask())


def report(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    base = next(o for o in outcomes if o.fault == "none")
    rows = [
        [
            o.fault,
            f"{o.seconds:.1f}",
            f"{args.items / o.seconds:,.0f}",
            "1.00 (baseline)" if o is base else f"{base.seconds / o.seconds:.2f}",
            f"+{o.seconds - base.seconds:.1f}" if o is not base else "",
            f"{o.injected_at:,}" if o is not base else "",
            f"{o.fault_seconds:.1f}" if o is not base else "",
            f"{o.stored:,} = items",
        ]
        for o in outcomes
    ]
    headers = [
        "fault",
        "apply → Succeeded, s",
        "items/s",
        "speed / no fault",
        "cost, s",
        "injected at (processed)",
        "injecting took, s",
        "result rows",
    ]
    title = (
        f"Faults on the clustered stack: {args.items:,} items, {args.workers} workers, "
        f"{args.handler_ms:g} ms handler, concurrency {args.concurrency}, fault at {args.at:.0%}"
    )
    return f"### {title}\n\n{common.markdown_table(headers, rows)}\n\n{common.machine()}\n"


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.splitlines()[0], default_items=100_000, workers=None)
    p.add_argument(
        "--faults",
        default=",".join(FAULTS[1:]),
        help=f"comma-separated, of: {', '.join(FAULTS[1:])} (the no-fault baseline always runs first)",
    )
    p.add_argument("--workers", type=int, default=2, help="mljob workers (default 2)")
    p.add_argument("--handler-ms", type=float, default=20.0, help="the handler's sleep (default 20 ms)")
    p.add_argument("--concurrency", type=int, default=16, help="handlers in flight per worker (default 16)")
    p.add_argument("--at", type=float, default=0.3, help="inject once this share is processed (default 0.3)")
    p.add_argument("--log-dir", help="where the processes' logs go (default: a new temporary directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.ha = True
    faults = ["none", *(f for f in args.faults.split(",") if f and f != "none")]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise SystemExit(f"unknown fault(s): {', '.join(unknown)}; known: {', '.join(FAULTS[1:])}")
    logs = mljob_common.log_dir(args, "faults")
    outcomes: list[Outcome] = []
    with common.local_stack(args) as stack:
        mljob_common.install_crds(stack)
        for fault in faults:
            with mljob_common.session(stack, logs, f"faults-{fault}") as session:
                run = FaultRun(stack, session, args)
                run.start()
                outcome = run.job(fault, run.inject(fault))
                outcomes.append(outcome)
                print(f"{fault}: {outcome.seconds:.1f}s, exact", file=sys.stderr, flush=True)
    print(report(outcomes, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
