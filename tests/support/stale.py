"""Stale and concurrent writers for guard-race tests: real threads, real stores, real apiserver."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from kubernetes import config as kube_config

from mljob.adapters.jobs_store import JobsStore
from mljob.adapters.kube import GuardFailed, JobRef, Kube
from mljob.adapters.results_store import make_pool
from mljob.api.models import Phase
from mljob.controller.terminal import finish_job, terminal_fields
from mljob.core import reconcile


def _run_in_threads(count: int, work: Any) -> list[Any]:
    """Start `count` threads that pass a barrier together, each running `work(index)` in its own loop."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def body(index: int) -> None:
        barrier.wait()
        results[index] = asyncio.run(work(index))

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _kube(e2e: Any) -> Kube:
    return Kube(kube_config.new_client_from_config(config_file=e2e.stack.kubeconfig))


def race_stale_writers(e2e: Any, uid: str, name: str, writers: int) -> list[tuple[bool, str]]:
    """Writers that believe the job is still Running try to make it Failed, in both stores."""
    ref = JobRef(e2e.namespace, name, uid)

    async def stale(_: int) -> tuple[bool, str]:
        pool = make_pool(e2e.stack.postgres_dsn, e2e.schema, min_size=1, max_size=1)
        await pool.open()
        try:
            outcome = await JobsStore(pool).finish(
                uid, Phase.FAILED, "Stale", "stale writer", None, "stale-test"
            )
        finally:
            await pool.close()
        kube = _kube(e2e)
        fields = terminal_fields({}, 1, Phase.FAILED, "Stale", "stale writer", None)
        try:
            await kube.guarded_status(ref, Phase.RUNNING.value, fields)  # what it read, long ago
            return True, "cr-overwritten"
        except GuardFailed:
            pass
        return outcome.won, outcome.row.phase.value

    return _run_in_threads(writers, stale)


def race_finishers(e2e: Any, uid: str, name: str, targets: list[Phase]) -> tuple[int, list[str]]:
    """Several full finishers (Postgres CAS, then CR mirror) with different verdicts at once."""
    ref = JobRef(e2e.namespace, name, uid)

    async def finisher(index: int) -> tuple[bool, str]:
        pool = make_pool(e2e.stack.postgres_dsn, e2e.schema, min_size=1, max_size=1)
        await pool.open()
        try:
            verdict = reconcile.Verdict(targets[index], f"Race{index}", f"finisher {index}")
            won, row, _ = await finish_job(
                JobsStore(pool), _kube(e2e), ref, 1, verdict, None, f"racer-{index}"
            )
        finally:
            await pool.close()
        return won, row.phase.value

    results = _run_in_threads(len(targets), finisher)
    return sum(1 for won, _ in results if won), [phase for _, phase in results]
