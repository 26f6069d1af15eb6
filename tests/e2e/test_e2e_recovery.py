"""Recovery end to end (issue 6; failure-modes rows 5, 8, 11, 12): each fault runs until the job
has to end, then the one invariant check (support.invariants) judges the end state."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import redis as redis_sync

from mljob import protocol
from support.env import E2E, configmap_manifests
from support.invariants import assert_job_invariants
from support.waiting import wait_for


def _condition(status: dict, type_: str) -> dict | None:  # type: ignore[type-arg]
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


def _wait_processed(e2e: E2E, name: str, at_least: int, timeout: float = 60) -> None:
    wait_for(
        lambda: (e2e.status(name).get("processed") or 0) >= at_least, timeout, what=f"{at_least} processed"
    )


def _delete_stream(e2e: E2E, pipeline: str) -> None:
    """What a NATS storage loss does to a job: its pipeline's stream (so its tasks and consumer)
    are gone."""

    async def delete() -> None:
        nc = await e2e.stack.nats()
        await nc.jetstream().delete_stream(protocol.task_stream(pipeline))
        await nc.close()

    asyncio.run(delete())


def test_redis_flushed_mid_flight_is_rebuilt_and_the_job_ends_with_exact_counts(e2e: E2E) -> None:
    """Row 12 / scenario C: FLUSHALL at ~30 %; the state comes back from the ledger."""
    items = [f"f-{i:04d}" for i in range(2000)]
    uid = e2e.apply("flushed", "flush", items)
    e2e.start_worker("flush", "slow", "--concurrency", "8", MLJOB_TEST_SLEEP="0.01")
    _wait_processed(e2e, "flushed", 600)
    client = redis_sync.Redis.from_url(e2e.stack.redis_url)
    client.flushall()
    client.close()
    status = e2e.wait_terminal("flushed", timeout=180)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 2000, 0), e2e.logs()
    rebuilt = _condition(status, "StateAvailable")
    assert rebuilt is not None and rebuilt["reason"] in ("StateRebuilt", "StateFound"), status
    events = e2e.kubectl.json(
        "-n", e2e.namespace, "get", "events", "--field-selector", "involvedObject.name=flushed"
    )
    assert "StateRebuilt" in {e["reason"] for e in events["items"]}
    assert_job_invariants(e2e, uid, items, "flush", status)


def test_transient_redis_outage_mid_flight_is_retried_and_fails_nothing(e2e: E2E) -> None:
    """Scenario B: Redis refuses every client for 3 s mid-flight."""
    items = [f"b-{i:04d}" for i in range(600)]
    uid = e2e.apply("blip", "blip", items)
    e2e.start_worker("blip", "slow", "--concurrency", "8", MLJOB_TEST_SLEEP="0.01")
    _wait_processed(e2e, "blip", 150)
    client = redis_sync.Redis.from_url(e2e.stack.redis_url)
    client.execute_command("CLIENT", "PAUSE", "3000", "ALL")
    client.close()
    status = e2e.wait_terminal("blip", timeout=120)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 600, 0), e2e.logs()
    assert_job_invariants(e2e, uid, items, "blip", status)


def test_stream_deleted_mid_flight_is_recreated_and_only_unfinished_items_redispatched(e2e: E2E) -> None:
    """Row 11: the job's stream vanishes at ~30 %; workers pick the recreated one up by themselves."""
    items = [f"s-{i:04d}" for i in range(2000)]
    uid = e2e.apply("streamless", "stream", items)
    e2e.start_worker("stream", "slow", "--concurrency", "8", MLJOB_TEST_SLEEP="0.01")
    _wait_processed(e2e, "streamless", 600)
    _delete_stream(e2e, "stream")
    status = e2e.wait_terminal("streamless", timeout=180)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 2000, 0), e2e.logs()
    assert status.get("streamRecreations") == 1
    assert _condition(status, "StreamAvailable")["reason"] == "StreamRecreated"  # type: ignore[index]
    assert_job_invariants(e2e, uid, items, "stream", status)


def test_an_item_removed_from_its_configmap_after_dispatch_is_redispatched_from_the_ledger(e2e: E2E) -> None:
    """The ConfigMap is edited after dispatch (one item removed), then the stream is lost with
    every task: re-dispatch publishes what the ledger recorded at dispatch, fields included, so
    the removed item is processed rather than failed as Lost after the stall timeout."""
    lines = [json.dumps({"id": f"e-{i:02d}", "page": i}) for i in range(10)]
    names, manifests = configmap_manifests("edited-items", lines)
    e2e.kubectl.run("-n", e2e.namespace, "apply", "-f", "-", stdin=manifests)
    uid = e2e.apply("edited", "edited", itemsFrom={"configMaps": names}, stallTimeoutSeconds=10)
    e2e.wait_phase("edited", {"Running"}, timeout=30)
    _, edited = configmap_manifests("edited-items", [line for line in lines if '"e-03"' not in line])
    e2e.kubectl.run("-n", e2e.namespace, "apply", "-f", "-", stdin=edited)
    _delete_stream(e2e, "edited")
    wait_for(lambda: e2e.status("edited").get("streamRecreations") == 1, 30, what="the recreation")
    e2e.start_worker("edited", "echo_item")
    status = e2e.wait_terminal("edited", timeout=90)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 10, 0), e2e.logs()
    with e2e.pg() as conn:
        cur = conn.execute("SELECT item_id, result FROM mljob_results WHERE job_uid = %s", (uid,))
        results = dict(cur.fetchall())
    assert results == {f"e-{i:02d}": {"item": {"id": f"e-{i:02d}", "page": i}} for i in range(10)}
    items = [f"e-{i:02d}" for i in range(10)]
    assert_job_invariants(e2e, uid, items, "edited", status)


def test_a_stream_lost_more_often_than_allowed_fails_the_job_with_stream_lost(e2e: E2E) -> None:
    assert e2e.operator is not None
    e2e.operator.stop()
    e2e.start_operator(MLJOB_MAX_STREAM_RECREATIONS="1")
    items = [f"l-{i:02d}" for i in range(20)]
    uid = e2e.apply("cursed", "nobody-pulls-cursed", items)
    e2e.wait_phase("cursed", {"Running"}, timeout=30)
    _delete_stream(e2e, "nobody-pulls-cursed")

    def recreated() -> bool:
        """The first recreation seen through (the count is written when it begins: a stream
        deleted again before it ends is the same loss, carried through by that recreation)."""
        status = e2e.status("cursed")
        available = _condition(status, "StreamAvailable")
        done = available is not None and (available["status"], available["reason"]) == (
            "True",
            "StreamRecreated",
        )
        return status.get("streamRecreations") == 1 and done

    wait_for(recreated, 30, what="the first recreation")
    _delete_stream(e2e, "nobody-pulls-cursed")
    status = e2e.wait_terminal("cursed", timeout=30)
    assert status["phase"] == "Failed"
    assert _condition(status, "Failed")["reason"] == "StreamLost"  # type: ignore[index]
    rows = assert_job_invariants(e2e, uid, items, "nobody-pulls-cursed", status)
    assert set(rows.values()) == {"failed"}
    e2e.operator.stop()
    e2e.start_operator()


def test_no_workers_shows_waiting_for_workers_until_the_deadline_fails_the_job(e2e: E2E) -> None:
    """Row 5, undelivered half: nothing is failed for want of workers, a condition says why;
    the deadline still applies and fails what is pending."""
    items = [f"w-{i:02d}" for i in range(10)]
    uid = e2e.apply("lonely", "nobody-pulls-lonely", items, stallTimeoutSeconds=10, activeDeadlineSeconds=25)

    def waiting() -> bool:
        stalled = _condition(e2e.status("lonely"), "Stalled")
        return bool(stalled and stalled["status"] == "True" and stalled["reason"] == "WaitingForWorkers")

    wait_for(waiting, 30, what="Stalled/WaitingForWorkers")
    assert e2e.status("lonely")["phase"] == "Running"
    assert e2e.result_rows(uid) == {}, "items were failed for want of workers"
    status = e2e.wait_terminal("lonely", timeout=40)
    assert status["phase"] == "Failed"
    assert _condition(status, "Failed")["reason"] == "DeadlineExceeded"  # type: ignore[index]
    rows = assert_job_invariants(e2e, uid, items, "nobody-pulls-lonely", status)
    with e2e.pg() as conn:
        errors = {r[0] for r in conn.execute("SELECT error FROM mljob_results WHERE job_uid = %s", (uid,))}
    assert len(rows) == 10 and all(e.startswith("DeadlineExceeded") for e in errors), errors


def test_worker_dies_holding_every_task_the_items_are_lost_after_the_stall_timeout(e2e: E2E) -> None:
    """Row 5, delivered half: the only worker pulled every task and died; after stallTimeoutSeconds
    with no activity the unfinished items fail as Lost and the threshold decides."""
    items = [f"d-{i:02d}" for i in range(12)]
    uid = e2e.apply("abandoned", "abandon", items, stallTimeoutSeconds=10, ackWaitSeconds=300)
    hog = e2e.start_worker("abandon", "slow", "--concurrency", "12", "--batch", "12", MLJOB_TEST_SLEEP="600")
    wait_for(lambda: e2e.status("abandoned").get("phase") == "Running", 30, what="dispatch")
    time.sleep(3)  # the worker holds all twelve
    hog.stop(signal.SIGKILL)
    status = e2e.wait_terminal("abandoned", timeout=60)
    assert status["phase"] == "Failed"
    assert _condition(status, "Failed")["reason"] == "FailureThresholdExceeded"
    rows = assert_job_invariants(e2e, uid, items, "abandon", status)
    assert set(rows.values()) == {"failed"}
    with e2e.pg() as conn:
        errors = {r[0] for r in conn.execute("SELECT error FROM mljob_results WHERE job_uid = %s", (uid,))}
    assert all(e.startswith("Lost") for e in errors), errors
    lost = next(d for d in status["diagnostics"] if d["reason"] == "Lost")
    assert "and 2 more" in lost["message"]


def test_cancel_goes_through_canceling_and_has_its_own_condition(e2e: E2E) -> None:
    items = [f"c-{i:02d}" for i in range(8)]
    uid = e2e.apply("cancel-me", "nobody-pulls-cancel", items)
    e2e.wait_phase("cancel-me", {"Running"}, timeout=30)
    e2e.kubectl.run(
        "-n", e2e.namespace, "patch", "mljob", "cancel-me", "--type=merge", "-p", '{"spec":{"cancel":true}}'
    )
    status = e2e.wait_terminal("cancel-me", timeout=30)
    assert status["phase"] == "Cancelled"
    cancelled = _condition(status, "Cancelled")
    assert cancelled is not None and cancelled["status"] == "True"
    assert cancelled["observedGeneration"] == 2, cancelled
    assert _condition(status, "Complete") is None and _condition(status, "Failed") is None
    waited = e2e.kubectl.run(
        "-n",
        e2e.namespace,
        "wait",
        "--for=condition=Complete",
        "--timeout=3s",
        "mljob/cancel-me",
        check=False,
    )
    assert waited.returncode != 0
    from support.invariants import transitions

    phases = [to for _, to, _ in transitions(e2e, uid)]
    assert phases[-2:] == ["Canceling", "Cancelled"], phases
    assert_job_invariants(e2e, uid, items, "nobody-pulls-cancel", status)


def test_deleting_a_running_job_records_it_cancelled_with_reason_deleted(e2e: E2E) -> None:
    items = [f"x-{i}" for i in range(5)]
    uid = e2e.apply("deleted", "nobody-pulls-deleted", items)
    e2e.wait_phase("deleted", {"Running"}, timeout=30)
    e2e.kubectl.run("-n", e2e.namespace, "delete", "mljob", "deleted", "--timeout=30s")
    job = e2e.job_row(uid)
    assert job is not None and (job["phase"], job["reason"]) == ("Cancelled", "Deleted")
    assert_job_invariants(e2e, uid, items, "nobody-pulls-deleted", deleted=True)


def test_ttl_deletes_the_finished_mljob_and_postgres_keeps_the_row(e2e: E2E) -> None:
    items = [f"t-{i}" for i in range(5)]
    uid = e2e.apply("short-lived", "ttl", items, ttlSecondsAfterFinished=3)
    e2e.start_worker("ttl", "quick")
    status = e2e.wait_terminal("short-lived", timeout=60)
    assert status["phase"] == "Succeeded"
    assert_job_invariants(e2e, uid, items, "ttl", status)

    def gone() -> bool:
        proc = e2e.kubectl.run("-n", e2e.namespace, "get", "mljob", "short-lived", check=False)
        return proc.returncode != 0 and "NotFound" in proc.stderr

    wait_for(gone, 40, what="the MLJob to be deleted after its TTL")
    job = e2e.job_row(uid)
    assert job is not None and job["phase"] == "Succeeded"


def test_a_ttl_set_after_the_job_finished_deletes_it(e2e: E2E) -> None:
    uid = e2e.apply("late-ttl", "late-ttl", ["lt-1", "lt-2"])
    e2e.start_worker("late-ttl", "quick")
    assert e2e.wait_terminal("late-ttl", timeout=60)["phase"] == "Succeeded"
    e2e.kubectl.run(
        "-n",
        e2e.namespace,
        "patch",
        "mljob",
        "late-ttl",
        "--type=merge",
        "-p",
        '{"spec":{"ttlSecondsAfterFinished":1}}',
    )

    def gone() -> bool:
        return e2e.kubectl.run("-n", e2e.namespace, "get", "mljob", "late-ttl", check=False).returncode != 0

    wait_for(gone, 30, what="the MLJob to be deleted after a TTL set once it had finished")
    job = e2e.job_row(uid)
    assert job is not None and job["phase"] == "Succeeded"


def test_deadline_fails_a_running_job_and_keeps_the_results_it_had(e2e: E2E) -> None:
    items = [f"dl-{i:02d}" for i in range(30)]
    uid = e2e.apply("too-slow", "deadline", items, activeDeadlineSeconds=12)
    e2e.start_worker("deadline", "slow", "--concurrency", "1", "--batch", "1", MLJOB_TEST_SLEEP="1")
    status = e2e.wait_terminal("too-slow", timeout=60)
    assert status["phase"] == "Failed"
    assert _condition(status, "Failed")["reason"] == "DeadlineExceeded"  # type: ignore[index]
    rows = assert_job_invariants(e2e, uid, items, "deadline", status)
    assert "succeeded" in set(rows.values()) and "failed" in set(rows.values())


def test_lost_state_with_no_ledger_items_is_reported_never_taken_as_complete(e2e: E2E) -> None:
    """Row 8: state gone and nothing to rebuild from: say so, never finish."""
    uid = e2e.apply("amnesia", "nobody-serves-amnesia", ["a-1", "a-2"])
    e2e.wait_phase("amnesia", {"Running"}, timeout=30)
    with e2e.pg() as conn:
        conn.execute("DELETE FROM mljob_items WHERE job_uid = %s", (uid,))
    client = redis_sync.Redis.from_url(e2e.stack.redis_url)
    client.delete(*e2e.redis_keys(uid))
    client.close()

    def reported() -> bool:
        found = _condition(e2e.status("amnesia"), "StateAvailable")
        return bool(found and found["reason"] == "StateMissing")

    wait_for(reported, 20, what="the StateMissing condition")
    time.sleep(2)
    assert e2e.status("amnesia")["phase"] == "Running"


def test_a_long_task_with_heartbeats_is_not_taken_for_a_stall(e2e: E2E) -> None:
    """Activity includes worker heartbeats: a 20 s task under a 10 s stall timeout succeeds."""
    items = ["long-1", "long-2"]
    uid = e2e.apply("patient", "patient", items, stallTimeoutSeconds=10, ackWaitSeconds=6)
    e2e.start_worker("patient", "slow", "--concurrency", "2", MLJOB_TEST_SLEEP="20")
    status = e2e.wait_terminal("patient", timeout=60)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 2, 0), e2e.logs()
    assert _condition(status, "Stalled") is None
    assert_job_invariants(e2e, uid, items, "patient", status)


def _publish_raw(e2e: E2E, subject: str, bodies: list[bytes]) -> None:
    async def publish() -> None:
        nc = await e2e.stack.nats()
        js = nc.jetstream()
        for body in bodies:
            await js.publish(subject, body)
        await nc.close()

    asyncio.run(publish())


def test_forged_results_are_refused_and_never_beat_the_real_outcome(e2e: E2E) -> None:
    """Results published by hand before the workers run: an unknown version, an oversized body,
    an id that is not an item. None is stored; each real item keeps its genuine outcome."""
    import json

    items = [f"fr-{i}" for i in range(6)]
    uid = e2e.apply("forged", "forged", items)
    e2e.wait_phase("forged", {"Running"}, timeout=30)

    def forged(item_id: str, **extra: object) -> bytes:
        body = {
            "version": protocol.PROTOCOL_VERSION,
            "job_uid": uid,
            "item_id": item_id,
            "outcome": "failed",
            "error": "forged",
        }
        body.update(extra)
        return json.dumps(body).encode()

    _publish_raw(
        e2e,
        protocol.results_subject("forged", uid),
        [forged("fr-0", version=99), forged("fr-1", result="x" * 600_000), forged("not-an-item")],
    )

    def dead_lettered() -> int:
        with e2e.pg() as conn:
            row = conn.execute(
                "SELECT count(*) FROM mljob_dead_letters WHERE subject = %s",
                (protocol.results_subject("forged", uid),),
            ).fetchone()
        return int(row[0]) if row else 0

    wait_for(lambda: dead_lettered() == 3, 30, what="three dead letters")
    assert e2e.result_rows(uid) == {}
    e2e.start_worker("forged", "quick")
    status = e2e.wait_terminal("forged", timeout=60)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 6, 0)
    rows = assert_job_invariants(e2e, uid, items, "forged", status)
    assert set(rows.values()) == {"succeeded"}
