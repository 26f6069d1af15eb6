"""An idle running job costs one Redis read per tick and no writes (counted at the apiserver)."""

from __future__ import annotations

import time

from support.env import E2E, apiserver_status_patches
from support.waiting import wait_for


def test_idle_running_job_causes_no_status_writes(e2e: E2E) -> None:
    e2e.apply("idle", "no-workers-here", [f"i-{i}" for i in range(10)])
    e2e.wait_phase("idle", {"Running"}, timeout=60)
    time.sleep(2)  # let the first progress tick settle
    before = apiserver_status_patches(e2e.kubectl)
    time.sleep(8)  # eight reconcile intervals (1 s in tests)
    after = apiserver_status_patches(e2e.kubectl)
    assert after == before, f"{after - before} status writes while idle"

    # The counter is live: one worker makes progress and the writes show up.
    e2e.start_worker("no-workers-here", "quick")
    wait_for(lambda: e2e.status("idle").get("phase") == "Succeeded", 60, what="completion")
    assert apiserver_status_patches(e2e.kubectl) > after


def test_completion_lands_within_seconds_not_on_the_next_tick(e2e: E2E) -> None:
    """With a 60 s reconcile interval, the collector's drained signal must finish the job."""
    assert e2e.operator is not None
    e2e.operator.stop()
    e2e.start_operator(MLJOB_RECONCILE_INTERVAL="60")
    e2e.apply("prompt", "prompt", [f"p-{i}" for i in range(50)])
    e2e.wait_phase("prompt", {"Running"}, timeout=30)
    started = time.monotonic()
    e2e.start_worker("prompt", "quick")
    status = e2e.wait_terminal("prompt", timeout=45)
    assert status["phase"] == "Succeeded"
    assert time.monotonic() - started < 30, "finished on a reconcile tick, not on the drained signal"
