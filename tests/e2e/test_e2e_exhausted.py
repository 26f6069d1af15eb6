"""End to end: items a worker dies on every time are failed once NATS gives up (rows 2, 3).

Real operator, real workers, real NATS/Redis/Postgres/apiserver. Three items kill the worker
process on every delivery; the test restarts workers whenever they die. After `maxDeliver`
deliveries NATS stops delivering those items, and only the max-deliveries advisory tells anyone.
Without the operator's handling the job hangs at 297/300 and this test times out.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

from mljob import protocol
from mljob.controller.exhausted import REASON
from support.env import E2E
from support.harness import TERMINAL, Proc
from support.invariants import assert_job_invariants

PIPELINE = "crashing"
CRASH_ITEMS = ["x-013", "x-150", "x-287"]
WORKERS = 2
JOB_TIMEOUT_SECONDS = 150.0  # an upper bound for waiting, not a timing assertion


def test_items_a_worker_always_dies_on_are_failed_and_the_job_ends_with_exact_counts(e2e: E2E) -> None:
    items = [f"x-{i:03d}" for i in range(300)]
    uid = e2e.apply("exhausted", PIPELINE, items, maxDeliver=2, ackWaitSeconds=5)
    crashes = _supervise_workers_until_terminal(e2e, "exhausted")
    status = e2e.status("exhausted")
    context = f"status={json.dumps(status)}\n{e2e.logs()}"
    assert crashes >= len(CRASH_ITEMS) * 2, context  # every crash item was delivered twice
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 300, 3), context
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "CompletedWithFailures", context

    job = e2e.job_row(uid)
    assert job is not None
    assert (job["phase"], job["reason"], job["total"], job["processed"], job["failed"]) == (
        "Succeeded",
        "CompletedWithFailures",
        300,
        300,
        3,
    )
    rows = e2e.result_rows(uid)
    assert len(rows) == 300
    failed = _failed_rows(e2e, uid)
    assert sorted(failed) == CRASH_ITEMS, failed
    for item_id, (error, attempts, _) in failed.items():
        assert error.startswith(f"{REASON}: "), (item_id, error)
        assert attempts == 2, (item_id, attempts)

    assert_job_invariants(e2e, uid, items, PIPELINE, status)
    latencies = _exhaustion_to_failed_seconds(e2e, uid, failed)
    print(
        "\nexhaustion (advisory timestamp) -> failed row (finished_at): "
        + ", ".join(f"{s:.3f}s" for s in latencies)
    )


def _supervise_workers_until_terminal(e2e: E2E, name: str) -> int:
    """Keep WORKERS workers alive (restarting the dead ones) until the job is terminal.

    Each worker takes one task at a time, so a crash loses only the task it died on.
    Returns how many workers died.
    """

    def start() -> Proc:
        return e2e.start_worker(
            PIPELINE,
            "crash_on_listed",
            "--concurrency",
            "1",
            "--batch",
            "1",
            MLJOB_TEST_CRASH_ITEMS=",".join(CRASH_ITEMS),
        )

    workers = [start() for _ in range(WORKERS)]
    crashes = 0
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    next_check = 0.0
    while True:
        for index, worker in enumerate(workers):
            if not worker.alive():
                assert worker.popen.returncode == 1, worker.log_tail()
                crashes += 1
                workers[index] = start()
        if time.monotonic() >= next_check:
            if e2e.status(name).get("phase") in TERMINAL:
                return crashes
            next_check = time.monotonic() + 1.0
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name} not terminal after {JOB_TIMEOUT_SECONDS:.0f}s ({crashes} worker crashes); "
                f"status={json.dumps(e2e.status(name))}\n{e2e.logs()}"
            )
        time.sleep(0.1)


def _failed_rows(e2e: E2E, uid: str) -> dict[str, tuple[str, int, datetime]]:
    with e2e.pg() as conn:
        cur = conn.execute(
            "SELECT item_id, error, attempts, finished_at FROM mljob_results "
            "WHERE job_uid = %s AND outcome = 'failed'",
            (uid,),
        )
        return {item: (error, attempts, finished) for item, error, attempts, finished in cur.fetchall()}


def _exhaustion_to_failed_seconds(
    e2e: E2E, uid: str, failed: dict[str, tuple[str, int, datetime]]
) -> list[float]:
    """Seconds from each max-deliveries advisory of the job to the failed row it produced.

    The advisory stream keeps handled advisories (limits retention). They are handled one by
    one in stream order, so the n-th advisory produced the n-th failure.
    """
    stamps = asyncio.run(_advisory_timestamps(e2e.stack, uid))
    assert len(stamps) == len(failed), stamps
    finished = sorted(row[2] for row in failed.values())
    return [(f - s).total_seconds() for s, f in zip(sorted(stamps), finished, strict=True)]


async def _advisory_timestamps(stack: Any, uid: str) -> list[datetime]:
    nc = await stack.nats()
    try:
        js = nc.jetstream()
        prefix = protocol.MAX_DELIVERIES_ADVISORY_SUBJECTS.removesuffix(".*.*")
        sub = await js.pull_subscribe(
            f"{prefix}.*.{protocol.task_consumer(uid)}", stream=protocol.ADVISORY_STREAM
        )
        stamps: list[datetime] = []
        while True:
            try:
                msgs: list[Any] = await sub.fetch(10, timeout=2)
            except TimeoutError:
                return stamps
            for msg in msgs:
                stamps.append(datetime.fromisoformat(json.loads(msg.data)["timestamp"]))
                await msg.ack()
    finally:
        await nc.close()


def test_chaos_exhaust_fails_only_the_chosen_items(e2e: E2E) -> None:
    """`mljob chaos exhaust` announces exhausted deliveries for chosen items of a live job: the
    operator fails exactly those, the rest are processed normally."""
    import subprocess

    from support.harness import mljob_cmd, wait_for
    from support.invariants import assert_job_invariants

    items = [f"ch-{i}" for i in range(5)]
    uid = e2e.apply("chosen", "chosen", items)
    e2e.wait_phase("chosen", {"Running"}, timeout=30)
    done = subprocess.run(
        mljob_cmd("chaos", "exhaust", f"{e2e.namespace}/chosen", "--items", "ch-1,ch-3,not-an-item"),
        env=e2e.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not-an-item has no task" in done.stdout
    wait_for(lambda: len(e2e.result_rows(uid)) == 2, 20, what="the two chosen items to fail")
    assert e2e.result_rows(uid) == {"ch-1": "failed", "ch-3": "failed"}
    e2e.start_worker("chosen", "quick")
    status = e2e.wait_terminal("chosen", timeout=60)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 5, 2)
    rows = assert_job_invariants(e2e, uid, items, "chosen", status)
    assert rows == {
        "ch-0": "succeeded",
        "ch-1": "failed",
        "ch-2": "succeeded",
        "ch-3": "failed",
        "ch-4": "succeeded",
    }
