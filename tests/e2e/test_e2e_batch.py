"""Batch handlers end to end: real `mljob worker` processes, the operator, NATS, Redis, Postgres.

Each fault runs until the job ends; the end state (phase, counts, Postgres rows, the invariant
check of support.invariants) is what is judged, never a timing. The handlers are in
e2e_support/handlers.py; those that record write one line per handler call, `<delivery>:<id> ...`.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from support.env import E2E
from support.harness import Proc
from support.invariants import assert_job_invariants
from support.waiting import wait_for


def calls(path: Path) -> list[list[tuple[int, str]]]:
    """The recorded handler calls: per call, (delivery, item id) of each task."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [[(int(d), i) for d, i in (t.split(":", 1) for t in line.split())] for line in lines if line]


def failed_errors(e2e: E2E, uid: str) -> dict[str, str]:
    with e2e.pg() as conn:
        cur = conn.execute(
            "SELECT item_id, error FROM mljob_results WHERE job_uid = %s AND outcome = 'failed'", (uid,)
        )
        return {item: error for item, error in cur.fetchall()}


def test_a_batch_handler_job_completes_with_exact_counts_and_one_row_per_item(
    e2e: E2E, tmp_path: Path
) -> None:
    items = [f"b-{i:03d}" for i in range(300)]
    record = tmp_path / "calls.txt"
    uid = e2e.apply("batch-ok", "batch-ok", items)
    for _ in range(2):
        e2e.start_worker("batch-ok", "batch_tenth_fail", "--concurrency", "2", MLJOB_TEST_RECORD=str(record))
    status = e2e.wait_terminal("batch-ok", timeout=120)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 300, 30), e2e.logs()
    rows = assert_job_invariants(e2e, uid, items, "batch-ok", status)
    assert sorted(i for i, outcome in rows.items() if outcome == "failed") == [
        i for i in items if i.endswith("7")
    ]
    assert set(failed_errors(e2e, uid).values()) == {
        f"item {i} is unreadable" for i in items if i.endswith("7")
    }
    handled = [item for call in calls(record) for _, item in call]
    assert sorted(handled) == items, "an item was handled twice or never"
    assert max(len(call) for call in calls(record)) > 1, "the tasks were never batched"
    assert max(len(call) for call in calls(record)) <= 16


def test_a_worker_sigkilled_mid_batch_loses_nothing_and_counts_nothing_twice(
    e2e: E2E, tmp_path: Path
) -> None:
    items = [f"k-{i:02d}" for i in range(60)]
    record = tmp_path / "first.txt"
    uid = e2e.apply("batch-kill", "batch-kill", items, ackWaitSeconds=5, maxDeliver=2)
    e2e.wait_phase("batch-kill", {"Running"}, timeout=60)  # every task waits: the first batch is full
    stuck = e2e.start_worker(
        "batch-kill",
        "batch_tenth_fail",
        "--batch-size",
        "8",
        "--concurrency",
        "1",
        MLJOB_TEST_RECORD=str(record),
        MLJOB_TEST_SLEEP="600",
    )
    wait_for(lambda: calls(record), 60, what="the first worker to be inside a batch")
    stuck.stop(signal.SIGKILL)
    held = {item for call in calls(record) for _, item in call}
    assert len(held) == 8, "the killed worker was not inside a full batch"
    second = tmp_path / "second.txt"
    e2e.start_worker("batch-kill", "batch_tenth_fail", "--batch-size", "8", MLJOB_TEST_RECORD=str(second))
    status = e2e.wait_terminal("batch-kill", timeout=120)
    failed = [i for i in items if i.endswith("7")]
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 60, len(failed)), (
        e2e.logs()
    )
    assert_job_invariants(e2e, uid, items, "batch-kill", status)
    retried = {item for call in calls(second) for delivery, item in call if delivery > 1}
    assert retried == held, "the killed batch's tasks were not (all) redelivered"
    assert all(len(call) == 1 for call in calls(second) if any(d > 1 for d, _ in call)), (
        "a redelivery was batched"
    )


def test_an_item_that_kills_its_worker_on_every_delivery_takes_no_batch_mate_with_it(
    e2e: E2E, tmp_path: Path
) -> None:
    """maxDeliver 2: the batch-mates of a poison item come back once, each alone, and succeed;
    only the poison item runs out of deliveries (MaxDeliveriesExceeded)."""
    items = [f"p-{i:03d}" for i in range(120)]
    poison = ["p-010", "p-075"]
    uid = e2e.apply("batch-poison", "batch-poison", items, ackWaitSeconds=5, maxDeliver=2)
    e2e.wait_phase("batch-poison", {"Running"}, timeout=60)  # batches are full from the start
    record = tmp_path / "calls.txt"
    env = {
        "MLJOB_TEST_CRASH_ITEMS": ",".join(poison),
        "MLJOB_TEST_RECORD": str(record),
        "MLJOB_TEST_SLEEP": "0.02",
    }
    workers: list[Proc] = []

    def start() -> None:
        workers.append(e2e.start_worker("batch-poison", "batch_crash_on_listed", "--concurrency", "1", **env))

    start()
    start()

    def finished() -> bool:
        for proc in [w for w in workers if not w.alive()]:
            workers.remove(proc)
            start()  # as a Deployment would
        return e2e.status("batch-poison").get("phase") in {"Succeeded", "Failed"}

    wait_for(finished, 180, interval=0.5, what="the poison job to end")
    status = e2e.status("batch-poison")
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 120, 2), e2e.logs()
    assert_job_invariants(e2e, uid, items, "batch-poison", status)
    errors = failed_errors(e2e, uid)
    assert sorted(errors) == poison
    assert all(e.startswith("MaxDeliveriesExceeded") for e in errors.values()), errors
    batch_mates = {item for call in calls(record) if any(i in poison for _, i in call) for _, item in call}
    assert batch_mates - set(poison), "no poison item shared a batch: the test proves nothing"


def test_a_batch_whose_handler_raises_is_retried_alone_and_only_the_bad_items_fail(
    e2e: E2E, tmp_path: Path
) -> None:
    items = [f"r-{i:02d}" for i in range(40)]
    bad = ["r-05", "r-23"]
    record = tmp_path / "calls.txt"
    uid = e2e.apply("batch-raise", "batch-raise", items, maxDeliver=2)
    e2e.wait_phase("batch-raise", {"Running"}, timeout=60)  # batches are full from the start
    e2e.start_worker(
        "batch-raise",
        "batch_raise_on_listed",
        MLJOB_TEST_BAD_ITEMS=",".join(bad),
        MLJOB_TEST_RECORD=str(record),
    )
    status = e2e.wait_terminal("batch-raise", timeout=120)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 40, 2), e2e.logs()
    assert_job_invariants(e2e, uid, items, "batch-raise", status)
    errors = failed_errors(e2e, uid)
    assert sorted(errors) == bad
    for item, error in errors.items():
        assert error == f"exhausted 2 deliveries: RuntimeError: model rejected the batch: {item}", error
    assert any(len(c) > 1 and any(i in bad for _, i in c) for c in calls(record)), (
        "bad items were never batched"
    )


def test_every_batch_raising_fails_every_item_after_max_deliver(e2e: E2E) -> None:
    items = [f"x-{i:02d}" for i in range(12)]
    uid = e2e.apply("batch-broken", "batch-broken", items, maxDeliver=2, failureThreshold=0.5)
    e2e.start_worker("batch-broken", "batch_raise_on_listed", MLJOB_TEST_BAD_ITEMS=",".join(items))
    status = e2e.wait_terminal("batch-broken", timeout=120)
    assert (status["phase"], status["processed"], status["failed"]) == ("Failed", 12, 12), e2e.logs()
    assert_job_invariants(e2e, uid, items, "batch-broken", status)
    assert all(e.startswith("exhausted 2 deliveries: RuntimeError") for e in failed_errors(e2e, uid).values())


def test_sigterm_mid_batch_naks_the_unfinished_batch_for_another_worker(e2e: E2E, tmp_path: Path) -> None:
    items = [f"s-{i:02d}" for i in range(40)]
    record = tmp_path / "calls.txt"
    uid = e2e.apply("batch-term", "batch-term", items, ackWaitSeconds=300)
    e2e.wait_phase("batch-term", {"Running"}, timeout=60)  # two full batches at once
    sleeper = e2e.start_worker(
        "batch-term",
        "batch_tenth_fail",
        "--batch-size",
        "8",
        "--concurrency",
        "2",
        "--grace-seconds",
        "1",
        MLJOB_TEST_SLEEP="600",
        MLJOB_TEST_RECORD=str(record),
    )
    wait_for(lambda: len(calls(record)) == 2, 60, what="two batches in the handler")
    assert sleeper.stop(signal.SIGTERM, timeout=20) == 0, sleeper.log_tail()
    naked = re.search(r"NAK (\d+) unfinished task", sleeper.log_tail(200))
    assert naked and int(naked.group(1)) == 16, sleeper.log_tail()
    e2e.start_worker("batch-term", "batch_tenth_fail")
    # ackWaitSeconds is 300: only the NAKs can bring the 16 tasks back within this wait.
    status = e2e.wait_terminal("batch-term", timeout=120)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 40, 4), e2e.logs()
    assert_job_invariants(e2e, uid, items, "batch-term", status)


def test_the_crash_hook_exits_after_a_batchs_results_are_stored_and_they_count_once(e2e: E2E) -> None:
    items = [f"c-{i:02d}" for i in range(30)]
    uid = e2e.apply("batch-hook", "batch-hook", items, ackWaitSeconds=5)
    crashed = e2e.start_worker("batch-hook", "batch_tenth_fail", MLJOB_WORKER_CRASH_AFTER_RESULT="c-03")
    wait_for(lambda: not crashed.alive(), 60, what="the worker to exit after c-03's result")
    assert crashed.popen.returncode == 137, crashed.log_tail()
    e2e.start_worker("batch-hook", "batch_tenth_fail")
    status = e2e.wait_terminal("batch-hook", timeout=120)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 30, 3), e2e.logs()
    assert_job_invariants(e2e, uid, items, "batch-hook", status)
