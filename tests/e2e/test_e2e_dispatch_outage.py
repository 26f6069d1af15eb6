"""nats-server restarted while a job dispatches (issue 13, section 4).

Before the fix, a PubAck lost in the restart was waited for forever: the MLJob stayed
`Dispatching` at its cursor with nothing moving. Now every wait on the publish path is bounded,
the step ends at the confirmed cursor and the next tick resumes there; the job ends exact.
A small dispatch window keeps the dispatch long enough for the restart to land in it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mljob_dev.devstack import restart
from support.env import E2E, configmap_manifests
from support.invariants import assert_job_invariants
from support.waiting import wait_for

ITEMS = 20_000


@pytest.mark.timeout(400)
def test_nats_restarted_mid_dispatch_the_job_resumes_and_ends_exact(e2e: E2E) -> None:
    assert e2e.operator is not None
    e2e.operator.stop()
    e2e.start_operator(MLJOB_DISPATCH_WINDOW="4", MLJOB_DISPATCH_PUBLISH_TIMEOUT_SECONDS="3")
    ids = [f"out-{i:05d}" for i in range(ITEMS)]
    names, manifests = configmap_manifests("outage-items", ids)
    e2e.kubectl.run("-n", e2e.namespace, "apply", "-f", "-", stdin=manifests)
    uid = e2e.apply("outage", "outage", itemsFrom={"configMaps": names})

    def mid_dispatch() -> bool:
        status = e2e.status("outage")
        return status.get("phase") == "Dispatching" and 0 < int(status.get("dispatchCursor", 0)) < ITEMS

    wait_for(mid_dispatch, 120, interval=0.05, what="dispatch to be under way")
    # In-process, not `mljob dev stack restart` (whose start-up alone can outlast a dispatch):
    # NATS stops at once, and the status read at the end of the outage shows it landed mid-dispatch.
    restart.stop(Path(e2e.stack.directory), "nats")
    time.sleep(5)
    status = e2e.status("outage")
    restart.start(Path(e2e.stack.directory), "nats")
    assert status.get("phase") == "Dispatching", f"the dispatch ended before NATS stopped: {status}"
    assert int(status.get("dispatchCursor", 0)) < ITEMS, status

    e2e.wait_phase("outage", {"Running"}, timeout=180)
    e2e.start_worker("outage", "quick", "--concurrency", "32", "--batch", "64")
    status = e2e.wait_terminal("outage", timeout=240)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", ITEMS, 0), e2e.logs()
    assert_job_invariants(e2e, uid, ids, "outage", status)
