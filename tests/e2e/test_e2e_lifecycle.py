"""End to end on the real stack: kubectl apply -> operator -> NATS -> `mljob worker` processes
-> collector -> Redis + Postgres -> guarded terminal status -> cleanup."""

from __future__ import annotations

from support.env import E2E


def _expected_outcome(item_id: str) -> str:
    return "failed" if int(item_id.split("-")[1]) % 10 == 7 else "succeeded"


def test_thousand_items_three_workers_ten_percent_fail(e2e: E2E) -> None:
    items = [f"img-{i:04d}" for i in range(1000)]
    uid = e2e.apply("thousand", "thumbs", items)
    for _ in range(3):
        e2e.start_worker("thumbs", "tenth_fail", "--concurrency", "8", "--batch", "16")

    status = e2e.wait_terminal("thousand", timeout=180)
    assert status["phase"] == "Succeeded", e2e.logs()
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "CompletedWithFailures"
    assert complete["status"] == "True"
    assert complete["observedGeneration"] == 1
    assert (status["total"], status["processed"], status["failed"], status["pending"]) == (1000, 1000, 100, 0)
    assert status["progress"] == "100%"
    assert status["completionTime"]

    row = e2e.kubectl.run("-n", e2e.namespace, "get", "mljobs", "thousand", "--no-headers").stdout.split()
    assert row[:6] == ["thousand", "Succeeded", "100%", "1000", "100", "1000"]

    job = e2e.job_row(uid)
    assert job is not None
    assert (job["phase"], job["reason"], job["total"], job["processed"], job["failed"]) == (
        "Succeeded",
        "CompletedWithFailures",
        1000,
        1000,
        100,
    )
    results = e2e.result_rows(uid)
    assert len(results) == 1000
    assert results == {item: _expected_outcome(item) for item in items}

    assert e2e.redis_keys(uid) == []
    assert e2e.nats_leftovers(uid, "thumbs") == {"consumer": False, "registry": False}

    events = e2e.kubectl.json(
        "-n", e2e.namespace, "get", "events", "--field-selector", "involvedObject.name=thousand"
    )["items"]
    reasons = sorted(event["reason"] for event in events)  # timestamps have 1 s resolution
    assert reasons == ["Running", "Succeeded"], reasons  # one chunk: straight to Running


def test_more_than_half_failing_fails_the_job(e2e: E2E) -> None:
    items = [f"doc-{i:03d}" for i in range(100)]
    uid = e2e.apply("mostly-bad", "strict", items)
    e2e.start_worker("strict", "mostly_fail")
    status = e2e.wait_terminal("mostly-bad")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "FailureThresholdExceeded")
    assert (status["processed"], status["failed"]) == (100, 60)
    job = e2e.job_row(uid)
    assert job is not None and (job["phase"], job["reason"], job["failed"]) == (
        "Failed",
        "FailureThresholdExceeded",
        60,
    )


def test_invalid_items_fail_the_job_with_a_reason_naming_the_item(e2e: E2E) -> None:
    uid = e2e.apply("dupes", "nobody", ["a", "b", "a"])
    status = e2e.wait_terminal("dupes", timeout=30)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidItems"
    assert "duplicate item id 'a' (items 0 and 2)" in failed["message"]
    job = e2e.job_row(uid)
    assert job is not None and job["phase"] == "Failed"


def test_deleting_a_running_job_cleans_up_through_the_finalizer(e2e: E2E) -> None:
    uid = e2e.apply("doomed", "nobody-home", [f"d-{i}" for i in range(5)])
    e2e.wait_phase("doomed", {"Running"}, timeout=30)
    assert e2e.get("doomed")["metadata"]["finalizers"] == ["mljob.dev/cleanup"]
    assert e2e.nats_leftovers(uid, "nobody-home") == {"consumer": True, "registry": True}
    assert e2e.redis_keys(uid)
    e2e.kubectl.run("-n", e2e.namespace, "delete", "mljob", "doomed", "--timeout=30s")
    assert e2e.nats_leftovers(uid, "nobody-home") == {"consumer": False, "registry": False}
    assert e2e.redis_keys(uid) == []


def test_cancelling_a_running_job_ends_it_cancelled_and_cleans_up(e2e: E2E) -> None:
    uid = e2e.apply("stop-me", "nobody-home-either", [f"c-{i}" for i in range(5)])
    e2e.wait_phase("stop-me", {"Running"}, timeout=30)
    e2e.kubectl.run(
        "-n", e2e.namespace, "patch", "mljob", "stop-me", "--type=merge", "-p", '{"spec": {"cancel": true}}'
    )
    status = e2e.wait_terminal("stop-me", timeout=30)
    assert status["phase"] == "Cancelled"
    job = e2e.job_row(uid)
    assert job is not None and job["phase"] == "Cancelled"
    assert e2e.nats_leftovers(uid, "nobody-home-either") == {"consumer": False, "registry": False}
    assert e2e.redis_keys(uid) == []
