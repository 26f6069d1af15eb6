"""Chaos end to end (issue 6, section 8): processes killed and servers restarted mid-job, a result
Postgres refuses on every delivery (scenario E), cancel racing completion both ways. Each fault
runs until the job has to end, then the one invariant check (support.invariants) judges it.

NATS and Postgres restarts hit the session's shared stack (`mljob dev stack restart`, same port,
same data); `stack_restored` makes sure every server answers again before the next test runs.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_sync

from mljob import protocol
from support.env import E2E
from support.harness import mljob_cmd
from support.invariants import assert_job_invariants
from support.waiting import wait_for

# --- servers of the shared stack --------------------------------------------------------------


def restart_service(e2e: E2E, service: str, down_seconds: float = 0.0) -> None:
    cmd = mljob_cmd("dev", "stack", "restart", service, "--dir", e2e.stack.directory)
    cmd += ["--down-seconds", str(down_seconds)]
    done = subprocess.run(cmd, env=e2e.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"restart {service} failed:\n{done.stdout}\n{done.stderr}"


def _answers(e2e: E2E) -> dict[str, bool]:
    async def nats_ok() -> None:
        nc = await e2e.stack.nats(connect_timeout=2, allow_reconnect=False)
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()

    def redis_ok() -> None:
        client = redis_sync.Redis.from_url(e2e.stack.redis_url, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()

    def postgres_ok() -> None:
        psycopg.connect(e2e.stack.postgres_dsn, connect_timeout=2).close()

    checks: dict[str, Callable[[], None]] = {
        "nats": lambda: asyncio.run(nats_ok()),
        "redis": redis_ok,
        "postgres": postgres_ok,
    }
    out = {}
    for name, check in checks.items():
        try:
            check()
            out[name] = True
        except Exception:
            out[name] = False
    return out


@pytest.fixture
def stack_restored(e2e: E2E) -> Iterator[None]:
    """After a test that restarts shared servers: every one answers again (restarted if not)."""
    yield
    try:
        wait_for(lambda: all(_answers(e2e).values()), 30, what="NATS, Redis and Postgres to answer")
    except AssertionError:
        for service, ok in _answers(e2e).items():
            if not ok:
                restart_service(e2e, service)
        answers = _answers(e2e)
        assert all(answers.values()), f"the shared stack is not restored: {answers}"


# --- helpers ----------------------------------------------------------------------------------


def _rows(e2e: E2E, uid: str) -> int:
    """Result rows of the job (-1 when unknown): closer to real time than the status."""
    try:
        with e2e.pg() as conn:
            row = conn.execute("SELECT count(*) FROM mljob_results WHERE job_uid = %s", (uid,)).fetchone()
    except psycopg.Error:  # away, or the operator has not migrated the schema yet
        return -1
    return int(row[0]) if row else 0


def _wait_rows(e2e: E2E, uid: str, at_least: int, timeout: float = 40) -> int:
    return int(
        wait_for(
            lambda: (n := _rows(e2e, uid)) >= at_least and n, timeout, interval=0.1, what=f"{at_least} rows"
        )
    )


def _cancel(e2e: E2E, name: str) -> None:
    e2e.kubectl.run(
        "-n", e2e.namespace, "patch", "mljob", name, "--type=merge", "-p", '{"spec":{"cancel":true}}'
    )


def _exact(status: dict[str, Any], total: int, failed: int = 0) -> tuple[Any, ...]:
    return (status["phase"], status.get("processed"), status.get("failed")), (
        "Succeeded" if failed * 2 <= total else "Failed",
        total,
        failed,
    )


# --- processes killed -------------------------------------------------------------------------


def test_operator_killed_at_half_and_restarted_ends_with_exact_counts(e2e: E2E) -> None:
    """The operator (with the in-process collector) SIGKILLed mid-job: results wait in the stream,
    the restarted operator resumes the job and collects them once."""
    assert e2e.operator is not None
    items = [f"ok-{i:04d}" for i in range(2000)]
    uid = e2e.apply("op-killed", "op-killed", items)
    e2e.start_worker("op-killed", "slow", "--concurrency", "8", MLJOB_TEST_SLEEP="0.02")
    at_kill = _wait_rows(e2e, uid, 1000)
    e2e.operator.stop(signal.SIGKILL)
    assert at_kill < 2000, "the job finished before the operator was killed"
    e2e.start_operator()
    status = e2e.wait_terminal("op-killed", timeout=90)
    got, want = _exact(status, 2000)
    assert got == want, e2e.logs()
    assert_job_invariants(e2e, uid, items, "op-killed", status)


def test_external_collector_killed_mid_flight_and_restarted_ends_with_exact_counts(e2e: E2E) -> None:
    """A separate `mljob collector` SIGKILLed mid-batch: what it had not acked is redelivered to
    its successor and counted once."""
    assert e2e.operator is not None
    e2e.operator.stop()
    e2e.start_operator("--no-collector")
    try:
        collector = e2e.start_collector()
        items = [f"ec-{i:04d}" for i in range(1500)]
        uid = e2e.apply("coll-killed", "coll-killed", items)
        e2e.start_worker("coll-killed", "slow", "--concurrency", "8", MLJOB_TEST_SLEEP="0.02")
        at_kill = _wait_rows(e2e, uid, 400)
        collector.stop(signal.SIGKILL)
        assert at_kill < 1500, "the job finished before the collector was killed"
        time.sleep(2)  # results pile up with no collector at all
        e2e.start_collector()
        status = e2e.wait_terminal("coll-killed", timeout=90)
        got, want = _exact(status, 1500)
        assert got == want, e2e.logs()
        assert_job_invariants(e2e, uid, items, "coll-killed", status)
    finally:
        for proc in e2e.procs:
            if proc.name == "collector":
                proc.stop()
        e2e.operator.stop()
        e2e.start_operator()


# --- servers restarted ------------------------------------------------------------------------


@pytest.mark.usefixtures("stack_restored")
def test_nats_restarted_mid_job_everyone_reconnects_and_counts_are_exact(e2e: E2E) -> None:
    """nats-server stopped and started again (file store kept): workers, the collector and the
    operator reconnect by themselves; acks lost in the restart only mean idempotent replays."""
    items = [f"nr-{i:04d}" for i in range(2000)]
    uid = e2e.apply("nats-restart", "nats-restart", items)
    e2e.start_worker("nats-restart", "slow", "--concurrency", "8", MLJOB_TEST_SLEEP="0.02")
    at_restart = _wait_rows(e2e, uid, 600)
    restart_service(e2e, "nats", down_seconds=1)
    assert at_restart < 2000, "the job finished before NATS was restarted"
    status = e2e.wait_terminal("nats-restart", timeout=90)
    got, want = _exact(status, 2000)
    assert got == want, e2e.logs()
    assert_job_invariants(e2e, uid, items, "nats-restart", status)


@pytest.mark.usefixtures("stack_restored")
def test_postgres_restarted_mid_job_and_at_completion_ends_once_with_exact_counts(e2e: E2E) -> None:
    """Postgres restarted at ~30 %, then again when the last result is about to land, so the
    terminal transition meets an outage: it is retried, lands once, and both stores agree."""
    items = [f"pr-{i:04d}" for i in range(1500)] + ["pr-last@2"]
    uid = e2e.apply("pg-restart", "pg-restart", items)
    e2e.start_worker("pg-restart", "sleep_from_id", "--concurrency", "8", MLJOB_TEST_SLEEP="0.02")
    _wait_rows(e2e, uid, 450)
    restart_service(e2e, "postgres", down_seconds=1)
    wait_for(lambda: _rows(e2e, uid) >= len(items) - 1, 60, what="all but the last result")
    restart_service(e2e, "postgres", down_seconds=2)
    status = e2e.wait_terminal("pg-restart", timeout=90)
    got, want = _exact(status, len(items))
    assert got == want, e2e.logs()
    assert_job_invariants(e2e, uid, items, "pg-restart", status)


# --- scenario E -------------------------------------------------------------------------------


def test_results_postgres_refuses_fail_their_items_with_result_rejected(e2e: E2E) -> None:
    """Scenario E: the worker's result for two items holds a NUL, refused on every delivery. The
    job ends by itself (no stall timeout is reached) and says why per item."""
    items = [f"e-{i:03d}" for i in range(60)]
    bad = ["e-007", "e-042"]
    uid = e2e.apply("rejected", "rejected", items, stallTimeoutSeconds=600)
    e2e.start_worker("rejected", "nul_on_listed", MLJOB_TEST_NUL_ITEMS=",".join(bad))
    status = e2e.wait_terminal("rejected", timeout=60)
    got, want = _exact(status, 60, 2)
    assert got == want, e2e.logs()
    rows = assert_job_invariants(e2e, uid, items, "rejected", status)
    assert sorted(item for item, outcome in rows.items() if outcome == "failed") == bad
    with e2e.pg() as conn:
        cur = conn.execute(
            "SELECT error, result FROM mljob_results WHERE job_uid = %s AND item_id = ANY(%s)", (uid, bad)
        )
        found = cur.fetchall()
        letters = conn.execute(
            "SELECT count(*) FROM mljob_dead_letters WHERE subject LIKE %s", (f"%{uid}%",)
        ).fetchone()
    assert all(error.startswith("ResultRejected: ") and result is None for error, result in found), found
    assert letters is not None and letters[0] >= 2, "the refused payloads are kept for inspection"


# --- cancel racing completion -----------------------------------------------------------------


def _assert_verdict(e2e: E2E, name: str, uid: str, items: list[str], pipeline: str, expected: str) -> None:
    """The verdict the order of events dictates, in both stores, every result recorded (late
    ones too); then the invariants."""
    status = e2e.wait_terminal(name, timeout=60)
    assert status["phase"] == expected, status
    wait_for(lambda: _rows(e2e, uid) == len(items), 30, what=f"every result of {name}")
    status = e2e.status(name)
    job = e2e.job_row(uid)
    assert job is not None and (status["phase"], job["phase"]) == (expected, expected), (status, job)
    assert_job_invariants(e2e, uid, items, pipeline, status)


def _cancel_now(e2e: E2E, name: str) -> None:
    """spec.cancel through the API client: no kubectl start between the event and the cancel."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.config import new_client_from_config

    api = CustomObjectsApi(new_client_from_config(config_file=e2e.stack.kubeconfig))
    api.patch_namespaced_custom_object(
        "mljob.dev", "v1alpha1", e2e.namespace, "mljobs", name, {"spec": {"cancel": True}}
    )


def _job_phase(e2e: E2E, uid: str) -> str | None:
    job = e2e.job_row(uid)
    return None if job is None else str(job["phase"])


def _held_jobs(e2e: E2E, prefix: str, count: int) -> tuple[str, Path, dict[str, tuple[str, list[str]]]]:
    """`count` running jobs whose tasks a gated worker holds until the test opens their gate."""
    pipeline = f"race-{prefix}"
    gates = Path(tempfile.mkdtemp(prefix="gates-", dir=e2e.log_dir))
    e2e.start_worker(pipeline, "gated", "--concurrency", str(6 * count), MLJOB_TEST_GATE_DIR=str(gates))
    jobs = {}
    for j in range(count):
        items = [f"{prefix}{j}-{i}" for i in range(6)]
        jobs[f"race-{prefix}-{j}"] = (e2e.apply(f"race-{prefix}-{j}", pipeline, items), items)
    for name, (uid, items) in jobs.items():
        e2e.wait_phase(name, {"Running"}, timeout=30)
        wait_for(lambda: _held_tasks(e2e, pipeline, uid) == len(items), 30, what=f"{name}'s tasks held")  # noqa: B023
    return pipeline, gates, jobs


def _held_tasks(e2e: E2E, pipeline: str, uid: str) -> int:
    """Tasks of the job a worker holds unacknowledged, with none left undelivered (else -1): a
    cancel's cleanup purges undelivered tasks, whose results would then never come."""

    async def ask() -> int:
        nc = await e2e.stack.nats()
        try:
            info = await nc.jetstream().consumer_info(
                protocol.task_stream(pipeline), protocol.task_consumer(uid)
            )
        finally:
            await nc.close()
        return int(info.num_ack_pending or 0) if not info.num_pending else -1

    return asyncio.run(ask())


def test_cancel_patched_the_moment_postgres_holds_the_completion(e2e: E2E) -> None:
    """Completion first, driven: each job's results are released, and spec.cancel is patched as
    soon as Postgres (the arbiter) holds Succeeded, before or while the MLJob is written. The
    cancel comes second: Succeeded, in both stores, never Cancelled."""
    pipeline, gates, jobs = _held_jobs(e2e, "done", 3)
    for j, (name, (uid, _)) in enumerate(jobs.items()):
        (gates / f"done{j}").touch()
        wait_for(lambda: _job_phase(e2e, uid) == "Succeeded", 30, interval=0.01, what=f"{name} decided")  # noqa: B023
        _cancel_now(e2e, name)
    for name, (uid, items) in jobs.items():
        _assert_verdict(e2e, name, uid, items, pipeline, "Succeeded")


def test_results_released_the_moment_postgres_holds_the_cancel(e2e: E2E) -> None:
    """Cancel first, driven: every task is held; spec.cancel is patched and each job's results
    are released as soon as Postgres holds Canceling (or already Cancelled), so they land while
    the cancel is carried out. The results come second: Cancelled, every late result recorded."""
    pipeline, gates, jobs = _held_jobs(e2e, "cancel", 3)
    for j, (name, (uid, _)) in enumerate(jobs.items()):
        _cancel_now(e2e, name)
        wait_for(
            lambda: _job_phase(e2e, uid) in ("Canceling", "Cancelled"),  # noqa: B023
            30,
            interval=0.01,
            what=f"{name}'s cancel decided",
        )
        (gates / f"cancel{j}").touch()
    for name, (uid, items) in jobs.items():
        _assert_verdict(e2e, name, uid, items, pipeline, "Cancelled")


def _cancelled_then_results(e2e: E2E, name: str) -> tuple[str, list[str], dict[str, Any]]:
    """A job whose held results are released only once it shows Cancelled: they surely land late."""
    pipeline = f"late-{name}"
    gates = Path(tempfile.mkdtemp(prefix="gates-", dir=e2e.log_dir))
    worker = e2e.start_worker(pipeline, "gated", "--concurrency", "8", MLJOB_TEST_GATE_DIR=str(gates))
    items = [f"lt-{i}" for i in range(4)]
    uid = e2e.apply(name, pipeline, items)
    e2e.wait_phase(name, {"Running"}, timeout=30)
    time.sleep(2)  # the worker holds every task
    _cancel(e2e, name)
    assert e2e.wait_terminal(name, timeout=30)["phase"] == "Cancelled"
    assert _rows(e2e, uid) == 0, "a held result landed before its gate opened"
    (gates / "lt").touch()
    wait_for(lambda: _rows(e2e, uid) == len(items), 30, what="the late results")
    time.sleep(1.5)  # a tick of the (finished) job's loop
    worker.stop()
    return uid, items, e2e.status(name)


def test_results_after_a_cancelled_verdict_are_recorded_and_change_nothing(e2e: E2E) -> None:
    uid, items, status = _cancelled_then_results(e2e, "late-results")
    job = e2e.job_row(uid)
    assert job is not None
    rows = assert_job_invariants(e2e, uid, items, "late-late-results", status)
    assert set(rows) == set(items), "every late result is recorded"
    assert job["processed"] < len(rows), "the verdict's counts stay as they were at the verdict"


@pytest.mark.usefixtures("stack_restored")
def test_deleting_a_job_while_redis_is_down_retries_the_finalizer_then_cleans_up(e2e: E2E) -> None:
    """The finalizer cannot clean up without Redis: the MLJob stays (finalizer held), the operator
    says why, and once Redis is back the cleanup runs and Postgres records Cancelled/Deleted."""
    import threading

    items = [f"fd-{i}" for i in range(4)]
    uid = e2e.apply("undeletable", "nobody-pulls-undeletable", items)
    e2e.wait_phase("undeletable", {"Running"}, timeout=30)
    outage = threading.Thread(target=restart_service, args=(e2e, "redis", 10.0))
    outage.start()

    def redis_down() -> bool:
        client = redis_sync.Redis.from_url(e2e.stack.redis_url, socket_connect_timeout=1)
        try:
            client.ping()
        except redis_sync.RedisError:
            return True
        finally:
            client.close()
        return False

    wait_for(redis_down, 30, interval=0.1, what="Redis to go down")
    e2e.kubectl.run("-n", e2e.namespace, "delete", "mljob", "undeletable", "--wait=false")
    assert e2e.operator is not None

    def said_why() -> bool:
        log = e2e.operator.log_path.read_text(errors="replace")  # type: ignore[union-attr]
        return f"cleanup of {e2e.namespace}/undeletable failed" in log

    wait_for(said_why, 15, what="the finalizer's retry line")
    still_there = e2e.kubectl.run("-n", e2e.namespace, "get", "mljob", "undeletable", check=False)
    assert still_there.returncode == 0, "the MLJob went away before its cleanup ran"
    outage.join()

    def gone() -> bool:
        return (
            e2e.kubectl.run("-n", e2e.namespace, "get", "mljob", "undeletable", check=False).returncode != 0
        )

    wait_for(gone, 60, what="the MLJob to be deleted once Redis is back")
    job = e2e.job_row(uid)
    assert job is not None and (job["phase"], job["reason"]) == ("Cancelled", "Deleted")
    assert_job_invariants(e2e, uid, items, "nobody-pulls-undeletable", deleted=True)
