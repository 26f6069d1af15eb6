"""Dispatch at scale: operator killed mid-dispatch (row 14), fairness across jobs (row 16)."""

from __future__ import annotations

import signal
from pathlib import Path

from support.env import E2E, configmap_manifests, job_tasks
from support.waiting import wait_for


def test_operator_killed_mid_dispatch_resumes_exactly_once(e2e: E2E, tmp_path: Path) -> None:
    # A slow, small-chunk operator so the kill lands mid-dispatch: a window of 4 unconfirmed
    # tasks makes it a few round trips per 8 tasks, so the cursor (written once a second) is seen
    # between its ends.
    assert e2e.operator is not None
    e2e.operator.stop()
    e2e.start_operator(MLJOB_DISPATCH_CHUNK="200", MLJOB_DISPATCH_WINDOW="4")
    ids = [f"big-{i:05d}" for i in range(20_000)]
    names, manifests = configmap_manifests("resume-items", ids)
    e2e.kubectl.run("-n", e2e.namespace, "apply", "-f", "-", stdin=manifests)
    uid = e2e.apply("resume", "resume", itemsFrom={"configMaps": names})

    def mid_dispatch() -> bool:
        cursor = int(e2e.status("resume").get("dispatchCursor", 0))
        return 2_000 <= cursor < 18_000

    wait_for(mid_dispatch, 120, interval=0.05, what="dispatch to be under way")
    e2e.operator.stop(signal.SIGKILL)
    cursor_at_kill = int(e2e.status("resume").get("dispatchCursor", 0))
    assert 0 < cursor_at_kill < 20_000

    e2e.start_operator()
    e2e.wait_phase("resume", {"Running"}, timeout=120)
    # Every item published exactly once (the stream is the pipeline's, and this test's own).
    assert job_tasks(e2e.stack, "resume", uid) == 20_000

    records = [tmp_path / f"w{i}.txt" for i in range(3)]
    for record in records:
        e2e.start_worker(
            "resume", "recording", "--concurrency", "32", "--batch", "64", MLJOB_TEST_RECORD=str(record)
        )
    status = e2e.wait_terminal("resume", timeout=300)
    assert (status["phase"], status["total"], status["processed"], status["failed"]) == (
        "Succeeded",
        20_000,
        20_000,
        0,
    )
    handled = [line for record in records for line in record.read_text().split()]
    assert len(handled) == 20_000 and set(handled) == set(ids), "every item processed exactly once"
    assert len(e2e.result_rows(uid)) == 20_000


def test_small_job_after_a_huge_one_finishes_first(e2e: E2E) -> None:
    ids = [f"huge-{i:05d}" for i in range(20_000)]
    names, manifests = configmap_manifests("huge-items", ids)
    e2e.kubectl.run("-n", e2e.namespace, "apply", "-f", "-", stdin=manifests)
    e2e.apply("huge", "shared", itemsFrom={"configMaps": names})
    e2e.wait_phase("huge", {"Running"}, timeout=120)
    e2e.start_worker("shared", "slow", "--concurrency", "8", "--batch", "16", MLJOB_TEST_SLEEP="0.005")
    wait_for(lambda: int(e2e.status("huge").get("processed", 0)) > 200, 60, what="the huge job to start")
    e2e.apply("small", "shared", [f"small-{i}" for i in range(20)])
    small = e2e.wait_terminal("small", timeout=120)
    huge_now = e2e.status("huge")
    assert small["phase"] == "Succeeded"
    assert huge_now["phase"] == "Running", "the small job must not wait for the huge one"
    assert int(huge_now["processed"]) < 20_000
    huge = e2e.wait_terminal("huge", timeout=300)
    assert huge["phase"] == "Succeeded"
    assert small["completionTime"] <= huge["completionTime"]
