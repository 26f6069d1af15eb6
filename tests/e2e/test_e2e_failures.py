"""End to end under failure: worker crashes and shutdowns, and guard races (rows 1, 4, 6, 7, 10)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis as redis_sync
from kubernetes.client.rest import ApiException

from mljob import protocol
from mljob.api.models import Phase
from support.env import E2E
from support.waiting import wait_for


def _read_lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_worker_killed_between_result_and_ack_is_redelivered_and_counted_once(
    e2e: E2E, tmp_path: Path
) -> None:
    items = [f"k-{i:02d}" for i in range(20)]
    uid = e2e.apply("crash-before-ack", "crashy", items, ackWaitSeconds=5)
    crashed = e2e.start_worker(
        "crashy", "quick", "--concurrency", "1", "--batch", "1", MLJOB_WORKER_CRASH_AFTER_RESULT="k-00"
    )
    wait_for(lambda: not crashed.alive(), 30, what="the worker to crash after publishing k-00's result")
    assert crashed.popen.returncode == 137, crashed.log_tail()
    time.sleep(6)  # past ackWaitSeconds: k-00 is due for redelivery
    record = tmp_path / "second.txt"
    e2e.start_worker(
        "crashy", "recording", "--concurrency", "1", "--batch", "1", MLJOB_TEST_RECORD=str(record)
    )
    status = e2e.wait_terminal("crash-before-ack", timeout=60)
    handled = _read_lines(record)
    assert "k-00" in handled, "k-00 was never redelivered"
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 20, 0)
    assert len(e2e.result_rows(uid)) == 20
    job = e2e.job_row(uid)
    assert job is not None and (job["processed"], job["failed"]) == (20, 0)


def test_sigterm_mid_batch_redelivers_within_seconds_not_after_ack_wait(e2e: E2E) -> None:
    items = [f"t-{i:02d}" for i in range(40)]
    e2e.apply("graceful", "sleepy", items, ackWaitSeconds=120)
    sleeper = e2e.start_worker(
        "sleepy", "slow", "--concurrency", "4", "--batch", "8", "--grace-seconds", "1", MLJOB_TEST_SLEEP="60"
    )
    wait_for(lambda: e2e.status("graceful").get("phase") == "Running", 30, what="dispatch")
    time.sleep(3)  # the worker has fetched a batch and is stuck in the handlers
    sent = time.monotonic()
    sleeper.stop(signal.SIGTERM, timeout=15)
    assert sleeper.popen.returncode == 0, sleeper.log_tail()
    assert re.search(r"NAK [1-9]\d* unfinished task", sleeper.log_tail(100)), sleeper.log_tail()
    e2e.start_worker("sleepy", "quick")
    status = e2e.wait_terminal("graceful", timeout=60)
    elapsed = time.monotonic() - sent
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 40, 0)
    assert elapsed < 60, (
        f"unfinished tasks came back after {elapsed:.0f}s, not within seconds (ackWait 120 s)"
    )


def test_terminal_verdict_survives_stale_writers_cancel_and_late_results(e2e: E2E) -> None:
    items = [f"g-{i:02d}" for i in range(30)]
    uid = e2e.apply("guarded", "guards", items)
    e2e.start_worker("guards", "quick")
    status = e2e.wait_terminal("guarded")
    assert status["phase"] == "Succeeded"

    # A stale writer that read "Running" races to Failed in both stores, with real concurrency.
    from support.stale import race_stale_writers

    outcomes = race_stale_writers(e2e, uid, "guarded", writers=8)
    assert all(not won for won, _ in outcomes), outcomes
    assert {phase for _, phase in outcomes} == {"Succeeded"}

    # Cancelling a finished job changes nothing; a late result is recorded and changes no verdict.
    e2e.kubectl.run(
        "-n",
        e2e.namespace,
        "patch",
        "mljob",
        "guarded",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"cancel": True}}),
    )
    # A late result for an item that already has its outcome changes nothing (first outcome
    # stands); one for an id that is not an item of the job is refused into the dead letters.
    _publish_late_result(e2e, uid, "g-00")
    _publish_late_result(e2e, uid, "g-late")

    def refused() -> bool:
        with e2e.pg() as conn:
            found = conn.execute(
                "SELECT reason FROM mljob_dead_letters WHERE subject = %s",
                (protocol.results_subject("guards", uid),),
            ).fetchall()
        return any("'g-late' is not an item" in reason for (reason,) in found)

    wait_for(refused, 20, what="the late non-item result to be dead-lettered")
    assert e2e.result_rows(uid)["g-00"] == "succeeded"
    # The finished job's loop sleeps until woken: a TTL set now wakes it (a tick that sees the
    # cancel and the late results), and its delete a few seconds later shows the loop ran. Every
    # status seen until then is the verdict as it was.
    seen = _statuses_until_deleted(e2e, "guarded", ttl_from_now=4)
    assert seen, "the MLJob was never read before its TTL delete"
    for after in seen:
        assert after["phase"] == "Succeeded"
        assert (after["processed"], after["failed"]) == (30, 0)
        assert after["completionTime"] == status["completionTime"]
        assert _reasons(after) == _reasons(status)
    job = e2e.job_row(uid)
    assert job is not None and (job["phase"], job["processed"]) == ("Succeeded", 30)
    assert e2e.redis_keys(uid) == [], "a late result must not resurrect the job's state"
    with e2e.pg() as conn:
        terminal_rows = conn.execute(
            "SELECT count(*) FROM mljob_transitions WHERE job_uid = %s AND to_phase = ANY(%s)",
            (uid, [Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.CANCELLED.value]),
        ).fetchone()
    assert terminal_rows == (1,)


def _reasons(status: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(c["type"], c["status"], c["reason"]) for c in status.get("conditions", [])}


def _statuses_until_deleted(e2e: E2E, name: str, ttl_from_now: int) -> list[dict[str, Any]]:
    """Set `ttlSecondsAfterFinished` so the finished MLJob is due `ttl_from_now` seconds from
    now (the change wakes its sleeping loop), then read its status until the TTL deletes it."""
    finished = datetime.fromisoformat(e2e.status(name)["completionTime"].replace("Z", "+00:00"))
    ttl = int((datetime.now(UTC) - finished).total_seconds()) + ttl_from_now
    patch = json.dumps({"spec": {"ttlSecondsAfterFinished": ttl}})
    e2e.kubectl.run("-n", e2e.namespace, "patch", "mljob", name, "--type=merge", "-p", patch)
    seen: list[dict[str, Any]] = []

    def deleted() -> bool:
        try:
            seen.append(e2e.status(name))
        except ApiException as err:
            if err.status == 404:
                return True
            raise
        return False

    wait_for(deleted, 60, what=f"the woken loop of {name} to delete it at its TTL")
    return seen


def test_concurrent_finishers_exactly_one_wins_and_the_cr_mirrors_it(e2e: E2E) -> None:
    uid = e2e.apply("racing", "nobody-serves-this", ["r-1", "r-2"])
    wait_for(lambda: e2e.status("racing").get("phase") == "Running", 30, what="dispatch")
    from support.stale import race_finishers

    winners, phases = race_finishers(e2e, uid, "racing", [Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED] * 4)
    assert winners == 1, phases
    assert len(set(phases)) == 1, phases
    final = phases[0]
    status = e2e.wait_terminal("racing", timeout=30)
    assert status["phase"] == final
    job = e2e.job_row(uid)
    assert job is not None and job["phase"] == final


def _publish_late_result(e2e: E2E, uid: str, item_id: str) -> None:
    async def publish() -> None:
        nc = await e2e.stack.nats()
        result = protocol.Result(job_uid=uid, item_id=item_id, outcome=protocol.Outcome.FAILED, error="late")
        await nc.jetstream().publish(
            protocol.results_subject("guards", uid),
            result.encode(),
            headers={protocol.MSG_ID_HEADER: protocol.result_msg_id(uid, item_id)},
        )
        await nc.close()

    threading.Thread(target=lambda: asyncio.run(publish())).start()


def test_cr_mirrors_postgres_after_a_crash_between_the_two_writes(e2e: E2E) -> None:
    """Postgres (the arbiter) went terminal, the MLJob did not, and the job's Redis state is gone:
    the restarted operator shows Postgres' verdict instead of waiting or guessing (rows 6-8)."""
    uid = e2e.apply("half-written", "nobody-serves-half", ["h-1", "h-2", "h-3"])
    e2e.wait_phase("half-written", {"Running"}, timeout=30)
    assert e2e.operator is not None
    e2e.operator.stop()
    with e2e.pg() as conn:
        conn.execute(
            "UPDATE mljob_jobs SET phase = 'Failed', reason = 'FailureThresholdExceeded', "
            "message = 'decided before the crash', completion_time = now() WHERE uid = %s",
            (uid,),
        )
    client = redis_sync.Redis.from_url(e2e.stack.redis_url)
    client.delete(*e2e.redis_keys(uid))
    client.close()
    e2e.start_operator()
    status = e2e.wait_terminal("half-written", timeout=30)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["reason"], failed["message"]) == ("FailureThresholdExceeded", "decided before the crash")
    assert e2e.nats_leftovers(uid, "nobody-serves-half") == {"consumer": False, "registry": False}
