"""The reconcile loop itself (`mljob.controller.loop.JobLoop`), driven tick by tick over in-memory fakes.

`core.reconcile.decide` is table-tested on its own; these tests check that the loop observes,
decides and acts so that each scenario of issue 6 ends in the right state in every store: the
MLJob, the jobs row and its audit, the results ledger, Redis, the stream and the registry.
Workers are simulated by moving tasks from the fake stream into results through the real
`mljob.ledger.record`. The clock is the real one plus an offset the tests move forward.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from mljob import protocol
from mljob.adapters.tasks import DispatchInterrupted
from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.controller.loop import JobLoop
from mljob.core import reconcile
from support.fakes import Clock, FakeWorld
from support.jobloop import (
    MAX_RECREATIONS,
    NAMESPACE,
    PIPELINE,
    STALL,
    item_ids,
    new_job,
    ref_of,
    running,
    status,
    uid_of,
)

pytestmark = pytest.mark.unit


async def ticks(loop: JobLoop, count: int = 1) -> bool:
    """Run `count` reconciles; what the last one returned (True: the loop may end)."""
    ended = False
    for _ in range(count):
        ended = await loop.step()
    return ended


def condition(body: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status(body).get("conditions", []) if c["type"] == type_), None)


def true_conditions(body: dict[str, Any]) -> set[str]:
    return {c["type"] for c in status(body).get("conditions", []) if c["status"] == "True"}


def failed_with(world: FakeWorld, uid: str, reason: str) -> set[str]:
    """Items whose result row is a failure the operator recorded with `reason`."""
    return {
        item
        for item, row in world.results.rows_of(uid).items()
        if row.outcome is protocol.Outcome.FAILED and (row.error or "").startswith(f"{reason}:")
    }


def assert_cleaned_up(world: FakeWorld, body: dict[str, Any]) -> None:
    uid = uid_of(body)
    stream = world.js.streams.get(protocol.task_stream(PIPELINE))
    assert stream is None or not [c for c in stream.consumers if c.startswith(protocol.task_consumer(uid))]
    assert world.js.task_ids(protocol.task_stream(PIPELINE), protocol.task_subject(PIPELINE, uid)) == []
    assert protocol.registry_key(PIPELINE, uid) not in world.registry.entries
    assert uid not in world.state.jobs


def assert_accounted(world: FakeWorld, body: dict[str, Any]) -> None:
    """The invariant of issue 6 section 8 for a job that ended with its work accounted for."""
    uid = uid_of(body)
    shown = status(body)
    row = world.jobs.records[uid]
    registered = world.results.items[uid]
    rows = world.results.rows_of(uid)
    assert set(rows) == set(registered), "every item has exactly one result row and no other row exists"
    failed = sum(1 for r in rows.values() if r.outcome is protocol.Outcome.FAILED)
    assert (shown["total"], shown["processed"], shown["failed"], shown["pending"]) == (
        len(registered),
        len(rows),
        failed,
        0,
    )
    assert (row.total, row.processed, row.failed) == (len(registered), len(rows), failed)
    assert shown["phase"] == row.phase.value
    terminal = [t for t in world.jobs.audit if t.uid == uid and t.to_phase in TERMINAL_PHASES]
    assert len(terminal) == 1, world.jobs.audit
    assert not [t for t in world.jobs.audit if t.uid == uid and t.from_phase in TERMINAL_PHASES]
    assert_cleaned_up(world, body)


# --- scenarios -----------------------------------------------------------------------------


async def test_happy_path(world: FakeWorld) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = JobLoop(world.services, body)

    assert not await loop.step()
    assert status(body)["phase"] == Phase.RUNNING
    assert sorted(
        world.js.task_ids(protocol.task_stream(PIPELINE), protocol.task_subject(PIPELINE, uid))
    ) == item_ids(10)
    assert protocol.registry_key(PIPELINE, uid) in world.registry.entries
    assert world.kube.phases_of(uid) == ["Dispatching", "Running"]

    assert len(await world.work(uid, 6)) == 6
    assert not await loop.step()
    assert (status(body)["processed"], status(body)["progress"]) == (6, "60%")
    assert world.jobs.records[uid].processed == 6
    writes = len(world.kube.writes)
    assert not await ticks(loop, 2)
    assert len(world.kube.writes) == writes, "an idle tick writes nothing"

    await world.work(uid, 10)
    assert await loop.step(), "a finished job without a TTL ends its loop"
    assert status(body)["phase"] == Phase.SUCCEEDED
    complete = condition(body, "Complete")
    assert complete is not None and (complete["status"], complete["reason"]) == ("True", "Completed")
    assert "Failed" not in true_conditions(body) and "Progressing" not in true_conditions(body)
    assert [e.reason for e in world.kube.events_of(uid)] == ["Dispatching", "Running", "Succeeded"]
    assert_accounted(world, body)


@pytest.mark.parametrize(
    ("failures", "phase", "reason"),
    [(3, Phase.FAILED, "FailureThresholdExceeded"), (2, Phase.SUCCEEDED, "CompletedWithFailures")],
)
async def test_verdict_follows_the_failure_threshold(
    world: FakeWorld, failures: int, phase: Phase, reason: str
) -> None:
    body = new_job(world, 10, failureThreshold=0.2)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 10, failed=frozenset(item_ids(failures)))

    assert await loop.step()
    assert status(body)["phase"] == phase
    verdict = "Failed" if phase is Phase.FAILED else "Complete"
    shown = condition(body, verdict)
    assert shown is not None and (shown["status"], shown["reason"]) == ("True", reason)
    assert ({"Complete", "Failed"} - {verdict}).isdisjoint(true_conditions(body))
    assert status(body)["failed"] == failures
    assert_accounted(world, body)


async def test_redis_state_lost_mid_run_is_rebuilt_from_the_ledger(world: FakeWorld) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 3, failed=frozenset({"item-001"}))
    assert not await loop.step()

    world.state.flush()  # FLUSHALL at 30 %
    await world.work(uid, 2)  # the collector stores these; Redis has no state to settle
    assert not await loop.step()

    rebuilt = condition(body, "StateAvailable")
    assert rebuilt is not None and (rebuilt["status"], rebuilt["reason"]) == ("True", "StateRebuilt")
    assert world.kube.events_of(uid, "StateRebuilt")
    counts = await world.state.counts(uid)
    assert counts is not None and (counts.total, counts.pending, counts.failed) == (10, 5, 1)
    assert not await loop.step()
    assert (status(body)["processed"], status(body)["failed"]) == (5, 1)

    await world.work(uid, 10)
    assert await loop.step()
    assert status(body)["phase"] == Phase.SUCCEEDED
    assert (status(body)["processed"], status(body)["failed"]) == (10, 1)
    assert_accounted(world, body)


async def test_stream_lost_mid_run_is_recreated_with_the_unresolved_items(world: FakeWorld) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    stream = protocol.task_stream(PIPELINE)
    loop = await running(world, body)
    held = world.pull(uid, 2)  # a worker is busy with these when the stream goes
    await world.work(uid, 3)
    assert not await loop.step()
    assert not await loop.step()

    await world.js.delete_stream(stream)
    assert not await loop.step()

    unresolved = await world.results.unresolved_items(uid)
    assert len(unresolved) == 7
    assert sorted(world.js.task_ids(stream)) == unresolved, "only items without a result are re-published"
    assert status(body)["streamRecreations"] == 1
    recreated = condition(body, "StreamAvailable")
    assert recreated is not None and recreated["reason"] == "StreamRecreated"
    assert world.kube.events_of(uid, "StreamRecreated")
    assert protocol.registry_key(PIPELINE, uid) in world.registry.entries

    await world.answer(held)  # the busy worker finishes after all
    await world.work(uid, 10)  # includes the re-published copies of the held items
    assert await loop.step()
    assert status(body)["phase"] == Phase.SUCCEEDED
    assert status(body)["streamRecreations"] == 1
    assert_accounted(world, body)


async def test_stream_lost_too_often_fails_the_job_with_stream_lost(world: FakeWorld) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    stream = protocol.task_stream(PIPELINE)
    loop = await running(world, body)
    await world.work(uid, 4)
    assert not await ticks(loop, 2)

    for attempt in range(1, MAX_RECREATIONS + 1):
        await world.js.delete_stream(stream)
        assert not await loop.step()
        assert status(body)["streamRecreations"] == attempt
        assert stream in world.js.streams
    await world.js.delete_stream(stream)
    assert await loop.step()

    assert status(body)["phase"] == Phase.FAILED
    failed = condition(body, "Failed")
    assert failed is not None and (failed["status"], failed["reason"]) == ("True", "StreamLost")
    assert status(body)["streamRecreations"] == MAX_RECREATIONS
    assert failed_with(world, uid, "StreamLost") == set(item_ids(10)[4:])
    assert_accounted(world, body)


@pytest.mark.parametrize(
    ("lost", "phase", "reason"),
    [(12, Phase.SUCCEEDED, "CompletedWithFailures"), (13, Phase.FAILED, "FailureThresholdExceeded")],
)
async def test_stall_with_every_task_delivered_fails_the_lost_items(
    world: FakeWorld, clock: Clock, lost: int, phase: Phase, reason: str
) -> None:
    body = new_job(world, 25)
    uid = uid_of(body)
    loop = await running(world, body)
    world.pull(uid, lost)  # a worker dies holding these; nobody comes back
    await world.work(uid, 25)
    assert not await ticks(loop, 2)
    info = await world.js.consumer_info(protocol.task_stream(PIPELINE), protocol.task_consumer(uid))
    assert (info.num_pending, info.num_ack_pending) == (0, lost)

    clock.advance(STALL - 5)
    assert not await loop.step()
    world.services.manage({uid}, world.services.waker)  # a job this operator manages
    world.services.heartbeats.record(uid, clock.time())  # a long task is not a stall
    clock.advance(10)
    assert not await loop.step()
    assert status(body)["phase"] == Phase.RUNNING and failed_with(world, uid, "Lost") == set()

    clock.advance(STALL)
    assert await loop.step()
    assert failed_with(world, uid, "Lost") == set(item_ids(lost))
    assert status(body)["phase"] == phase
    verdict = condition(body, "Failed" if phase is Phase.FAILED else "Complete")
    assert verdict is not None and verdict["reason"] == reason
    diagnostic = status(body)["diagnostics"][-1]
    assert diagnostic["reason"] == "Lost"
    assert f"and {lost - 10} more" in diagnostic["message"]
    assert "item-009" in diagnostic["message"] and "item-010" not in diagnostic["message"]
    assert world.kube.events_of(uid, "Lost")
    assert_accounted(world, body)


async def test_stall_with_undelivered_tasks_waits_for_workers(world: FakeWorld, clock: Clock) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 3)
    assert not await ticks(loop, 2)

    clock.advance(STALL + 1)
    assert not await loop.step()
    stalled = condition(body, "Stalled")
    assert stalled is not None and (stalled["status"], stalled["reason"]) == ("True", "WaitingForWorkers")
    assert "7 of 10 tasks were never delivered" in stalled["message"]
    assert world.results.rows_of(uid).keys() == set(item_ids(3)), "nothing is failed"
    assert status(body)["phase"] == Phase.RUNNING
    writes = len(world.kube.writes)
    assert not await ticks(loop, 2)
    assert len(world.kube.writes) == writes, "a job still waiting writes nothing more"

    await world.work(uid, 2)  # a worker is back
    assert not await loop.step()
    cleared = condition(body, "Stalled")
    assert cleared is not None and (cleared["status"], cleared["reason"]) == ("False", "WorkMoving")

    await world.work(uid, 10)
    assert await loop.step()
    assert status(body)["phase"] == Phase.SUCCEEDED
    assert_accounted(world, body)


async def test_deadline_fails_pending_items_and_the_job(world: FakeWorld, clock: Clock) -> None:
    body = new_job(world, 10, activeDeadlineSeconds=30)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 4, failed=frozenset({"item-000"}))
    assert not await loop.step()

    clock.advance(31)
    assert await loop.step()
    assert status(body)["phase"] == Phase.FAILED
    failed = condition(body, "Failed")
    assert failed is not None and (failed["status"], failed["reason"]) == ("True", "DeadlineExceeded")
    assert failed_with(world, uid, "DeadlineExceeded") == set(item_ids(10)[4:])
    assert world.jobs.records[uid].reason == "DeadlineExceeded"
    assert_accounted(world, body)


async def test_work_finished_before_the_deadline_is_not_failed_by_it(world: FakeWorld, clock: Clock) -> None:
    body = new_job(world, 10, activeDeadlineSeconds=30)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 10)  # every outcome lands before the deadline
    clock.advance(31)  # the next tick comes after it (operator busy, restarted, interval)
    assert await loop.step()
    assert status(body)["phase"] == Phase.SUCCEEDED


async def test_cancel(world: FakeWorld) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = await running(world, body)
    held = world.pull(uid, 1)
    await world.work(uid, 3)
    assert not await loop.step()
    writes_before = len(world.kube.writes)

    world.kube.edit_spec(body, cancel=True)
    assert body["metadata"]["generation"] == 2
    assert await loop.step()

    assert world.kube.phases_of(uid)[-2:] == ["Canceling", "Cancelled"]
    assert [(t.from_phase, t.to_phase) for t in world.jobs.audit][-2:] == [
        ("Running", "Canceling"),
        ("Canceling", "Cancelled"),
    ]
    shown = status(body)
    assert shown["phase"] == Phase.CANCELLED and shown["observedGeneration"] == 2
    assert "Cancelled" in true_conditions(body)
    assert not {"Complete", "Failed"} & true_conditions(body)
    for write in world.kube.writes[writes_before:]:
        old = {c["type"]: c for c in write.before.get("conditions", [])}
        for written in write.after.get("conditions", []):
            if old.get(written["type"]) != written:
                assert written["observedGeneration"] == 2, written
    assert world.kube.events_of(uid, "Canceling") and world.kube.events_of(uid, "Cancelled")
    assert_cleaned_up(world, body)

    await world.answer(held)  # a worker finishes its task after the cancel
    assert held[0].task.item_id in world.results.rows_of(uid)
    await ticks(loop, 2)
    assert status(body)["phase"] == Phase.CANCELLED
    assert world.jobs.records[uid].phase is Phase.CANCELLED
    assert len([t for t in world.jobs.audit if t.to_phase in TERMINAL_PHASES]) == 1
    assert_cleaned_up(world, body)


async def test_cancel_racing_completion_mirrors_the_winner(world: FakeWorld) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 10)
    # The job was finished in Postgres (the arbiter) and the MLJob write did not land yet...
    row = await world.jobs.get(uid)
    counts = await world.state.counts(uid)
    assert row is not None and counts is not None
    won = await world.jobs.finish(uid, Phase.SUCCEEDED, "Completed", "all 10 items succeeded", counts, "peer")
    assert won.won
    # ...when the user cancels.
    world.kube.edit_spec(body, cancel=True)
    assert await loop.step()

    assert status(body)["phase"] == Phase.SUCCEEDED
    assert "Complete" in true_conditions(body)
    assert not {"Cancelled", "Failed"} & true_conditions(body)
    assert "Canceling" not in world.kube.phases_of(uid)
    assert all(t.to_phase != "Canceling" for t in world.jobs.audit)
    assert_accounted(world, body)


async def test_ttl_deletes_the_mljob_after_it_finished(world: FakeWorld, clock: Clock) -> None:
    body = new_job(world, 4, ttlSecondsAfterFinished=60)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 4)

    assert await loop.step(), "finished: the loop sleeps until the TTL"
    assert status(body)["phase"] == Phase.SUCCEEDED
    assert_cleaned_up(world, body)
    sleep = loop._until_ttl()
    assert sleep is not None and 55 < sleep <= 61, sleep
    clock.advance(30)
    assert await loop.step()
    assert world.kube.deleted == []

    clock.advance(31)
    assert await loop.step()
    assert world.kube.deleted == [ref_of(body)]
    assert (NAMESPACE, "job") not in world.kube.jobs
    assert world.jobs.records[uid].phase is Phase.SUCCEEDED, "Postgres keeps the row"


async def test_a_ttl_set_after_the_job_finished_still_deletes_it(world: FakeWorld, clock: Clock) -> None:
    body = new_job(world, 2)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 2)
    assert await loop.step()
    assert loop._until_ttl() is None, "no TTL: sleep until woken"
    body["spec"]["ttlSecondsAfterFinished"] = 5
    clock.advance(6)
    assert await loop.step()
    assert world.kube.deleted == [ref_of(body)]


async def test_missing_items_configmap_dispatches_nothing(world: FakeWorld) -> None:
    body = new_job(world, itemsFrom={"configMaps": ["batch-items"]})
    uid = uid_of(body)
    loop = JobLoop(world.services, body)

    assert not await ticks(loop, 2)
    missing = condition(body, "ItemsSourceReady")
    assert missing is not None and (missing["status"], missing["reason"]) == ("False", "ItemsSourceMissing")
    assert "batch-items" in missing["message"]
    assert status(body)["phase"] == Phase.PENDING
    assert world.js.streams == {} and world.registry.entries == {}
    assert uid not in world.state.jobs and uid not in world.results.items

    world.kube.configmaps[(NAMESPACE, "batch-items")] = {"ids": "\n".join(item_ids(5))}
    assert not await loop.step()
    assert status(body)["phase"] == Phase.RUNNING
    ready = condition(body, "ItemsSourceReady")
    assert ready is not None and ready["status"] == "True"
    assert sorted(
        world.js.task_ids(protocol.task_stream(PIPELINE), protocol.task_subject(PIPELINE, uid))
    ) == item_ids(5)


async def test_consumer_lost_mid_run_is_recreated_and_the_stream_drained(world: FakeWorld) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    stream = protocol.task_stream(PIPELINE)
    loop = await running(world, body)
    world.pull(uid, 2)  # held by a worker that dies with the consumer
    await world.work(uid, 3)
    assert not await ticks(loop, 2)

    await world.js.delete_consumer(stream, protocol.task_consumer(uid))
    assert not await loop.step()
    assert status(body)["streamRecreations"] == 1
    assert sorted(world.js.task_ids(stream)) == await world.results.unresolved_items(uid), "no duplicates"

    await world.work(uid, 10)
    assert await loop.step()
    assert status(body)["phase"] == Phase.SUCCEEDED
    assert_accounted(world, body)


async def test_a_silent_consumer_is_replaced_skipping_replacements_placed_on_the_lost_server(
    world: FakeWorld, clock: Clock
) -> None:
    """The R1 consumer's server is lost: after `consumer_replace_seconds` of silence the job gets
    the next generation's consumer. NATS marks a SIGKILLed server offline only after its orphan
    timeout, so the first two replacements land on the lost server too (their creation times
    out): the one replacement skips them at once instead of waiting for them to fall silent."""
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 3)
    assert not await ticks(loop, 2)

    world.js.unanswering |= {protocol.task_consumer(uid, generation) for generation in range(3)}
    assert not await ticks(loop, 2)
    assert not status(body).get("consumerGeneration"), "silence shorter than the bound is waited out"
    clock.advance(world.services.settings.consumer_replace_seconds + 1)
    assert not await loop.step()

    assert status(body)["consumerGeneration"] == 3
    registered = world.registry.entries[protocol.registry_key(PIPELINE, uid)]
    entry = protocol.RegistryEntry.model_validate_json(registered)
    assert entry.consumer == protocol.task_consumer(uid, 3)
    replaced = [d for d in status(body)["diagnostics"] if d["reason"] == "ConsumerReplaced"]
    assert len(replaced) == 1, "one replacement, however many placements it took"
    available = condition(body, "ConsumerAvailable")
    assert available is not None
    assert (available["status"], available["reason"]) == ("True", "ConsumerReplaced")
    assert [e.reason for e in world.kube.events_of(uid)].count("ConsumerReplaced") == 1

    world.js.unanswering.clear()  # the server back: the job's cleanup removes every generation
    await world.work(uid, 10)
    assert await loop.step()
    assert status(body)["phase"] == Phase.SUCCEEDED
    assert_accounted(world, body)


async def test_a_consumer_nats_answers_is_offline_is_replaced_too(world: FakeWorld, clock: Clock) -> None:
    """A server stopped cleanly is known to NATS as offline: requests about its consumers are
    answered at once with "consumer is offline" (err_code 10119), not a timeout. That is the
    same silence: the consumer is replaced after the bound, not retried forever."""
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 4)
    assert not await ticks(loop, 2)

    world.js.offline.add(protocol.task_consumer(uid))
    assert not await ticks(loop, 2)
    clock.advance(world.services.settings.consumer_replace_seconds + 1)
    assert not await loop.step()
    assert status(body)["consumerGeneration"] == 1

    world.js.offline.clear()
    await world.work(uid, 10)
    assert await loop.step()
    assert status(body)["phase"] == Phase.SUCCEEDED
    assert_accounted(world, body)


async def test_dispatch_interrupted_resumes_from_the_cursor(world: FakeWorld) -> None:
    """NATS fails mid-dispatch (the stream survives): the next tick publishes the rest, once."""
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = JobLoop(world.services, body)

    def hiccup(calls: int) -> None:
        if calls == 5:
            raise TimeoutError("nats: timeout")

    world.js.before_publish = hiccup
    with pytest.raises(DispatchInterrupted, match="TimeoutError: nats: timeout"):
        await loop.step()
    assert (status(body)["phase"], status(body)["dispatchCursor"]) == (Phase.DISPATCHING, 4)

    assert not await loop.step()
    assert status(body)["phase"] == Phase.RUNNING
    assert world.js.task_ids(
        protocol.task_stream(PIPELINE), protocol.task_subject(PIPELINE, uid)
    ) == item_ids(10)
    await world.work(uid, 10)
    assert await loop.step()
    assert_accounted(world, body)


async def test_stream_lost_while_dispatching_republishes_what_it_held(world: FakeWorld) -> None:
    body = new_job(world, 10)
    stream = protocol.task_stream(PIPELINE)
    loop = JobLoop(world.services, body)

    def lose_stream(calls: int) -> None:
        if calls == 5:  # after the first chunk of 4
            world.js.streams.pop(stream, None)

    world.js.before_publish = lose_stream
    with pytest.raises(DispatchInterrupted, match="NoRespondersError"):  # no stream listens any more
        await loop.step()
    world.js.before_publish = None
    assert status(body)["dispatchCursor"] == 4

    assert not await loop.step()
    assert status(body)["phase"] == Phase.RUNNING
    assert sorted(world.js.task_ids(stream)) == item_ids(10), "every item without a result has a task"


@pytest.mark.parametrize("edit", ["deleted", "item removed"])
async def test_stream_lost_after_the_items_configmap_changed_redispatches_what_dispatch_recorded(
    world: FakeWorld, edit: str
) -> None:
    """Re-dispatch builds its tasks from the ledger's record of each item (id and fields), not
    from the ConfigMap, which the user may have tidied up or edited since dispatch."""
    lines = [json.dumps({"id": item, "page": n}) for n, item in enumerate(item_ids(6))]
    world.kube.configmaps[(NAMESPACE, "batch-items")] = {"ids": "\n".join(lines)}
    body = new_job(world, itemsFrom={"configMaps": ["batch-items"]})
    uid = uid_of(body)
    loop = await running(world, body)
    assert sorted(await world.work(uid, 2)) == item_ids(2)
    assert not await ticks(loop, 2)

    if edit == "deleted":
        del world.kube.configmaps[(NAMESPACE, "batch-items")]
    else:
        world.kube.configmaps[(NAMESPACE, "batch-items")] = {"ids": "\n".join(lines[:5])}
    await world.js.delete_stream(protocol.task_stream(PIPELINE))
    assert not await ticks(loop, 2)  # the loss is seen, then re-dispatched
    assert status(body).get("streamRecreations") == 1
    stream, subject = protocol.task_stream(PIPELINE), protocol.task_subject(PIPELINE, uid)
    assert sorted(world.js.task_ids(stream, subject)) == item_ids(6)[2:]
    pulled = world.pull(uid, 10)
    assert sorted((p.task.item_id, p.task.item["page"]) for p in pulled) == [
        (f"item-00{n}", n) for n in range(2, 6)
    ]
    await world.answer(pulled)
    assert await ticks(loop, 1)
    assert (status(body)["phase"], status(body)["processed"], status(body)["failed"]) == (
        Phase.SUCCEEDED,
        6,
        0,
    )
    assert_accounted(world, body)


async def test_deleting_a_running_mljob_records_it_as_cancelled(world: FakeWorld) -> None:
    from mljob.controller.actions.cleanup import on_deleted

    body = new_job(world, 10)
    uid = uid_of(body)
    await running(world, body)
    await world.work(uid, 4)

    await on_deleted(world.services, ref_of(body), PIPELINE)
    row = world.jobs.records[uid]
    assert (row.phase, row.reason, row.processed) == (Phase.CANCELLED, "Deleted", 4)
    assert [t.to_phase for t in world.jobs.audit if t.to_phase in TERMINAL_PHASES] == ["Cancelled"]
    assert_cleaned_up(world, body)


@pytest.mark.parametrize("fail_at", ["publish", "register"])
async def test_a_recreation_interrupted_halfway_is_carried_through_and_counted_once(
    world: FakeWorld, fail_at: str
) -> None:
    """NATS lost the stream and the registry entry; the tick that recreates them fails halfway
    (a timeout, or the operator dying). The next ticks finish the job: every unresolved item is
    published again, the entry is back, and the loss is counted once."""
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 3)
    await ticks(loop, 2)
    await world.js.delete_stream(protocol.task_stream(PIPELINE))
    world.registry.entries.pop(protocol.registry_key(PIPELINE, uid), None)
    target: Any = world.js if fail_at == "publish" else world.registry
    method = "publish_async" if fail_at == "publish" else "put"
    real = getattr(target, method)

    async def timeout(*args: Any, **kwargs: Any) -> Any:
        raise TimeoutError(f"{method} timed out")

    setattr(target, method, timeout)
    with pytest.raises(DispatchInterrupted if fail_at == "publish" else TimeoutError):
        await loop.step()
    setattr(target, method, real)
    await ticks(loop, 3)
    assert protocol.registry_key(PIPELINE, uid) in world.registry.entries
    assert status(body)["streamRecreations"] == 1
    available = condition(body, "StreamAvailable")
    assert available is not None and (available["status"], available["reason"]) == ("True", "StreamRecreated")
    await world.work(uid, 7)
    await ticks(loop, 2)
    assert status(body)["phase"] == Phase.SUCCEEDED
    assert (status(body)["processed"], status(body)["failed"]) == (10, 0)


async def test_nothing_pending_and_no_ledger_items_is_said_once_and_backs_off(
    world: FakeWorld, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis shows every item done, the ledger knows no item of the job (e.g. another database):
    no exact counts to finish on. One warning and a condition, then the loop backs off like a
    quiet job instead of warning every interval forever."""
    body = new_job(world, 4)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.state.mark_failed(uid, item_ids(4), 0.0)  # Redis: nothing pending
    world.results.items.pop(uid)  # the ledger: no items
    settings = world.services.settings
    sleeps = []
    with caplog.at_level("WARNING"):
        for _ in range(6):
            assert not await loop.step()
            assert loop.snapshot is not None
            sleeps.append(
                reconcile.next_tick(
                    loop.snapshot,
                    loop.quiet_ticks,
                    settings.reconcile_interval,
                    settings.idle_reconcile_interval,
                )
            )
    warnings = [r for r in caplog.records if "Redis shows nothing pending" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    shown = condition(body, "StateAvailable")
    assert shown is not None and (shown["status"], shown["reason"]) == ("False", "LedgerMissing")
    assert status(body)["phase"] == Phase.RUNNING  # never finished on counts it does not have
    assert sleeps == sorted(sleeps) and sleeps[-1] >= 16 * sleeps[0], sleeps


@pytest.mark.parametrize(
    "decided",
    [
        reconcile.Verdict(Phase.SUCCEEDED, "Completed", "decided by the core"),
        reconcile.Verdict(Phase.FAILED, "FailureThresholdExceeded", "decided by the core"),
    ],
)
async def test_finish_applies_the_verdict_the_core_decided(
    world: FakeWorld, decided: reconcile.Verdict
) -> None:
    """The FINISH action carries out `plan.verdict` (decided once, in the core) once the ledger
    backs its counts; it does not decide a verdict of its own (both verdicts here differ from
    what the threshold would say, so an action deciding again fails this test)."""
    body = new_job(world, 4)
    uid = uid_of(body)
    loop = await running(world, body)
    await world.work(uid, 4, failed=frozenset({"item-000"}))
    counts = await world.state.counts(uid)
    assert counts is not None and (counts.pending, counts.failed) == (0, 1)
    plan = reconcile.Plan(reconcile.Action.FINISH, decided, reconcile.progress_fields(counts, 4))
    assert await loop.act(plan, counts)
    shown = status(body)
    assert (shown["phase"], world.jobs.records[uid].phase) == (decided.phase, decided.phase)
    progressing = condition(body, "Progressing")
    assert progressing is not None and progressing["reason"] == decided.reason


async def test_a_verdict_the_ledger_does_not_back_is_not_applied(world: FakeWorld) -> None:
    """Redis shows every item done without failures, the ledger holds 3 failures of 4: the
    decided Succeeded is not applied; Redis is rebuilt from the ledger and the next tick decides
    Failed on it."""
    body = new_job(world, 4)
    uid = uid_of(body)
    loop = await running(world, body)
    pulled = world.pull(uid, 4)
    failures = frozenset({"item-000", "item-001", "item-002"})
    await world.answer(pulled, failed=failures)
    world.state.flush()  # Redis lost it ...
    await world.state.initialize(uid, [])  # ... and holds a wrong copy: nothing pending, no failure
    assert not await loop.step()
    assert status(body)["phase"] == Phase.RUNNING
    assert await world.state.failed_ids(uid) == failures  # rebuilt from the ledger
    assert await loop.step()
    assert status(body)["phase"] == Phase.FAILED
