"""The one scheduler (`mljob.controller.scheduler`) over the in-memory fakes: the watch feeds it,
due jobs go to a bounded pool of workers, a job is never reconciled twice at once, a deleted job
is cleaned up and released, and a follower replica does nothing.

The test plays kopf's watch: it hands the scheduler each event (`observe`) as kopf's event
handler does. The same behaviour against the real servers is in tests/e2e (every job there runs
through it) and tests/e2e/test_e2e_idle.py; its cost is measured by bench/mljob_many.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mljob import protocol
from mljob.controller.loop import JobLoop
from mljob.controller.scheduler import Scheduler
from mljob.core import index
from support.fakes import FakeWorld
from support.jobloop import PIPELINE, new_job, status, uid_of
from support.waiting import eventually

pytestmark = pytest.mark.unit


class Leading:
    def __init__(self, leads: bool = True) -> None:
        self.leading = asyncio.Event()
        if leads:
            self.leading.set()


@pytest.fixture
async def scheduler(world: FakeWorld) -> AsyncIterator[Scheduler]:
    sched = Scheduler(world.services, workers=4, leader=Leading())
    sched.start()
    yield sched
    await sched.stop()


async def until(check: Callable[[], Any], timeout: float = 3.0) -> None:
    """The one wait-for helper, polled finely: the fake world moves in milliseconds."""
    await eventually(check, timeout, interval=0.005, what="the scheduler to get there")


def live(world: FakeWorld, body: dict[str, Any]) -> dict[str, Any] | None:
    return world.kube.jobs.get((body["metadata"]["namespace"], body["metadata"]["name"]))


def leftovers(world: FakeWorld, uid: str) -> dict[str, bool]:
    stream = world.js.streams.get(protocol.task_stream(PIPELINE))
    return {
        "consumer": stream is not None and protocol.task_consumer(uid) in stream.consumers,
        "registry": protocol.registry_key(PIPELINE, uid) in world.registry.entries,
        "redis": uid in world.state.jobs,
    }


def count_ticks(sched: Scheduler, uid: str) -> list[float]:
    """Wrap the job's tick to record when each one started."""
    loop = sched.jobs[uid]
    started: list[float] = []
    tick = loop.tick

    async def counted() -> float | None:
        started.append(asyncio.get_running_loop().time())
        return await tick()

    loop.tick = counted  # type: ignore[method-assign]
    return started


async def test_a_new_mljob_gets_the_finalizer_first_and_reaches_running(
    world: FakeWorld, scheduler: Scheduler
) -> None:
    body = new_job(world, 10)
    scheduler.observe("ADDED", body)
    await until(lambda: status(body).get("phase") == "Running")
    assert body["metadata"]["finalizers"] == [index.FINALIZER]
    scheduler.observe("MODIFIED", body)  # the watch brings the Running object back
    assert "items" not in scheduler.jobs[uid_of(body)].view.body["spec"], "the index drops the items"


async def test_a_deleted_mljob_is_cleaned_up_then_released_and_forgotten(
    world: FakeWorld, scheduler: Scheduler
) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    scheduler.observe("ADDED", body)
    await until(lambda: status(body).get("phase") == "Running" and all(leftovers(world, uid).values()))
    await world.kube.delete_job(scheduler.jobs[uid].view.ref)  # kubectl delete: only marked
    assert live(world, body) is not None, "our finalizer holds it"
    scheduler.observe("MODIFIED", body)  # the watch shows the deletionTimestamp
    await until(lambda: live(world, body) is None)
    assert leftovers(world, uid) == {"consumer": False, "registry": False, "redis": False}
    row = world.jobs.records[uid]
    assert (row.phase, row.reason) == ("Cancelled", "Deleted")
    scheduler.observe("DELETED", body)
    assert uid not in scheduler.jobs and uid not in scheduler.due


async def test_another_controllers_finalizer_is_left_in_place(world: FakeWorld, scheduler: Scheduler) -> None:
    body = new_job(world, 4)
    body["metadata"]["finalizers"] = ["other.io/keep"]
    scheduler.observe("ADDED", body)
    await until(lambda: status(body).get("phase") == "Running")
    assert body["metadata"]["finalizers"] == ["other.io/keep", index.FINALIZER]
    await world.kube.delete_job(scheduler.jobs[uid_of(body)].view.ref)
    scheduler.observe("MODIFIED", body)
    await until(lambda: body["metadata"]["finalizers"] == ["other.io/keep"])
    assert live(world, body) is not None, "still held by the other controller"


async def test_stopping_the_operator_cleans_nothing_up(world: FakeWorld) -> None:
    sched = Scheduler(world.services, workers=2, leader=Leading())
    sched.start()
    body = new_job(world, 10)
    uid = uid_of(body)
    sched.observe("ADDED", body)
    await until(lambda: status(body).get("phase") == "Running")
    await sched.stop()
    assert leftovers(world, uid) == {"consumer": True, "registry": True, "redis": True}
    assert live(world, body) is not None


async def test_a_quiet_job_is_looked_at_less_often_until_woken(
    world: FakeWorld, scheduler: Scheduler
) -> None:
    world.services.settings.reconcile_interval = 0.01
    world.services.settings.idle_reconcile_interval = 0.16
    body = new_job(world, 10)
    uid = uid_of(body)
    scheduler.observe("ADDED", body)
    await until(lambda: status(body).get("phase") == "Running")
    ticks = count_ticks(scheduler, uid)
    await asyncio.sleep(1.0)
    # Every 0.01 s that is about 100 ticks; doubling to 0.16 s: 0.01+0.02+0.04+0.08, then 0.16.
    quiet = len(ticks)
    assert 4 <= quiet <= 12, ticks
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) >= 0.15 and gaps[-1] < 0.3, gaps

    await world.work(uid, 3)  # results arrive, and the collector wakes the job
    world.services.wake(uid)
    await asyncio.sleep(0.05)
    assert len(ticks) >= quiet + 2, "woken, the job is looked at at once and then at the short interval"
    assert status(body)["processed"] == 3


async def test_a_job_woken_while_it_is_reconciled_runs_once_more_never_twice_at_once(
    world: FakeWorld, scheduler: Scheduler
) -> None:
    world.services.settings.reconcile_interval = 30  # no look of its own during the test
    world.services.settings.idle_reconcile_interval = 30
    body = new_job(world, 4)
    uid = uid_of(body)
    scheduler.observe("ADDED", body)
    await until(lambda: status(body).get("phase") == "Running")
    await until(lambda: uid not in scheduler.busy)
    loop = scheduler.jobs[uid]
    inside, peak, runs = 0, 0, 0
    release = asyncio.Event()
    tick = loop.tick

    async def slow_tick() -> float | None:
        nonlocal inside, peak, runs
        inside += 1
        runs += 1
        peak = max(peak, inside)
        await release.wait()
        inside -= 1
        return await tick()

    loop.tick = slow_tick  # type: ignore[method-assign]
    scheduler.wake(uid)
    await until(lambda: inside == 1)
    for _ in range(5):  # results keep arriving while the job is being reconciled
        scheduler.wake(uid)
    release.set()
    await until(lambda: runs == 2 and uid not in scheduler.busy)
    await asyncio.sleep(0.05)
    assert (peak, runs) == (1, 2), "five wake-ups during a reconcile make exactly one more"


async def test_many_new_jobs_dispatch_a_few_at_a_time_each_woken_when_a_slot_frees(
    world: FakeWorld, scheduler: Scheduler
) -> None:
    """Ten thousand MLJobs created together all registered their items at once and queued on
    the Postgres pool until its waits timed out; they take turns, and one waiting for a slot
    holds no worker and does not wait out a reconcile interval either."""
    world.services.settings.reconcile_interval = 30  # a job waiting in line would wait this long
    world.services.dispatch_slots = asyncio.Semaphore(2)
    inside, peak = 0, 0
    register = world.results.register_items

    async def slow_register(uid: str, ids: Any) -> None:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0.01)
        inside -= 1
        await register(uid, ids)

    world.results.register_items = slow_register  # type: ignore[method-assign]
    bodies = [new_job(world, 4, name=f"job-{n}") for n in range(12)]
    for body in bodies:
        scheduler.observe("ADDED", body)
    await until(lambda: {status(b).get("phase") for b in bodies} == {"Running"}, timeout=5)
    assert peak == 2


async def test_a_follower_reconciles_nothing_until_it_leads(world: FakeWorld) -> None:
    leader = Leading(leads=False)
    sched = Scheduler(world.services, workers=2, leader=leader)
    sched.start()
    try:
        body = new_job(world, 4)
        sched.observe("ADDED", body)  # the follower's index is kept warm from the watch
        await asyncio.sleep(0.1)
        assert uid_of(body) in sched.jobs and "phase" not in status(body)
        assert world.kube.writes == [] and not body["metadata"].get("finalizers")
        leader.leading.set()
        await until(lambda: status(body).get("phase") == "Running")
    finally:
        await sched.stop()


async def test_events_of_other_kinds_of_change_do_not_wake_the_job(
    world: FakeWorld, scheduler: Scheduler
) -> None:
    world.services.settings.reconcile_interval = 30
    world.services.settings.idle_reconcile_interval = 30
    body = new_job(world, 4)
    uid = uid_of(body)
    scheduler.observe("ADDED", body)
    await until(lambda: status(body).get("phase") == "Running")
    scheduler.observe("MODIFIED", body)  # the Running object back from the watch: one more look
    await until(lambda: uid not in scheduler.busy and uid not in scheduler.again)
    await until(lambda: (scheduler.due.due_at(uid) or 0) > asyncio.get_running_loop().time() + 10)
    ticks = count_ticks(scheduler, uid)
    body["status"]["processed"] = 1  # our own progress write, back from the watch
    scheduler.observe("MODIFIED", body)
    assert (scheduler.due.due_at(uid) or 0) > asyncio.get_running_loop().time() + 10, "not due now"
    await asyncio.sleep(0.05)
    assert ticks == []
    world.kube.edit_spec(body, cancel=True)  # kubectl patch: a new generation
    scheduler.observe("MODIFIED", body)
    await until(lambda: status(body).get("phase") == "Cancelled")
    assert len(ticks) >= 1


def test_a_job_loop_holds_no_items_once_dispatched(world: FakeWorld) -> None:
    body = new_job(world, 1_000)
    body["status"] = {"phase": "Running"}
    loop = JobLoop(world.services, index.slim(body))
    assert "items" not in loop.view.body["spec"]


async def test_a_replica_that_takes_over_counts_no_stall_for_the_time_it_only_watched(
    world: FakeWorld, clock: Any
) -> None:
    """A follower saw the job long ago; when it starts leading, activity counts from then, as
    when an operator restarts (a restart never counts as a stall)."""
    first = Scheduler(world.services, workers=2, leader=Leading())
    first.start()
    body = new_job(world, 10, stallTimeoutSeconds=60)
    first.observe("ADDED", body)
    await until(lambda: status(body).get("phase") == "Running")
    await first.stop()

    leader = Leading(leads=False)
    follower = Scheduler(world.services, workers=2, leader=leader)
    follower.start()
    try:
        follower.observe("ADDED", body)  # the standby's warm index
        clock.advance(3_600)  # an hour of watching; no worker pulled anything meanwhile
        leader.leading.set()
        await asyncio.sleep(0.2)
        assert status(body)["phase"] == "Running"
        assert not any(c["type"] == "Stalled" and c["status"] == "True" for c in status(body)["conditions"])
    finally:
        await follower.stop()


async def test_a_replica_that_takes_over_decides_on_the_status_the_leader_wrote(world: FakeWorld) -> None:
    """The standby saw the job created (no status) and then only the leader's writes go by in
    the watch; once it leads it carries the Running job on, and never tries to write it back
    to Dispatching (which the API server refuses, every time)."""
    leader = Leading(leads=False)
    standby = Scheduler(world.services, workers=2, leader=leader)
    standby.start()
    first = Scheduler(world.services, workers=2, leader=Leading())
    try:
        body = new_job(world, 3 * world.services.settings.dispatch_chunk)
        standby.observe("ADDED", index.slim(body))  # the first event: no status yet
        first.start()
        first.observe("ADDED", body)
        await until(lambda: status(body).get("phase") == "Running")
        await first.stop()
        standby.observe("MODIFIED", index.slim(body))  # the leader's writes, as watched
        tried: list[dict[str, Any]] = []
        patch = world.kube.patch_status

        async def recording(job: Any, fields: dict[str, Any]) -> None:
            tried.append(fields)
            await patch(job, fields)

        world.kube.patch_status = recording  # type: ignore[method-assign]
        leader.leading.set()
        await until(lambda: standby.jobs[uid_of(body)].snapshot is not None)
        assert [f["phase"] for f in tried if "phase" in f] in ([], ["Succeeded"]), tried
        assert status(body)["phase"] == "Running"
    finally:
        await standby.stop()


async def test_a_status_write_the_server_refuses_reads_the_stored_status_again(world: FakeWorld) -> None:
    """A view behind the stored status (the watch had not caught up with another replica's
    write): the refused write makes the loop read the status again, and the next tick goes on
    from there instead of being refused every minute."""
    sched = Scheduler(world.services, workers=2, leader=Leading())
    sched.start()
    try:
        body = new_job(world, 3 * world.services.settings.dispatch_chunk)
        sched.observe("ADDED", index.slim(body))
        await until(lambda: status(body).get("phase") == "Running")
        loop = sched.jobs[uid_of(body)]
        loop.view.status = {}  # as a replica that saw only the creation
        sched.wake(uid_of(body))
        await until(lambda: loop.view.status.get("phase") == "Running")
        assert status(body)["phase"] == "Running"
    finally:
        await sched.stop()


async def test_jobs_due_together_are_observed_in_one_redis_read(world: FakeWorld) -> None:
    """An operator restarted under many live MLJobs: kopf's listing makes all of them due at once,
    and their counts come from one batched read, not one round trip per job."""
    first = Scheduler(world.services, workers=8, leader=Leading())
    first.start()
    bodies = [new_job(world, 4, name=f"job-{n}") for n in range(20)]
    for body in bodies:
        first.observe("ADDED", body)
    await until(lambda: {status(b).get("phase") for b in bodies} == {"Running"})
    await first.stop()

    single, batched = 0, []
    counts, counts_many = world.state.counts, world.state.counts_many

    async def one(uid: str) -> Any:
        nonlocal single
        single += 1
        return await counts(uid)

    async def many(uids: Any) -> Any:
        batched.append(len(uids))
        return await counts_many(uids)

    world.state.counts = one  # type: ignore[method-assign]
    world.state.counts_many = many  # type: ignore[method-assign]
    world.services.settings.reconcile_interval = 30  # only the restart's first look
    restarted = Scheduler(world.services, workers=8, leader=Leading())
    restarted.start()
    try:
        for body in bodies:  # kopf's initial listing
            restarted.observe(None, body)
        await until(lambda: sum(batched) + single >= 20)
        await until(lambda: not restarted.busy)
        assert sum(batched) >= 16 and single <= 4, (batched, single)
        assert max(batched) <= 8, "at most as many as there are free workers"
    finally:
        await restarted.stop()


def test_the_watch_handler_runs_on_the_event_loop_not_in_a_thread() -> None:
    """kopf runs a plain (sync) handler in a thread of its executor; the scheduler is not
    thread-safe (a burst of 10,000 MLJobs once left its feeder asleep on an Event set from
    that thread, every job waiting forever), so the handler must be a coroutine function."""
    import inspect

    from mljob.controller import handlers

    assert inspect.iscoroutinefunction(handlers.job_event)


async def test_the_scheduler_refuses_a_watch_event_from_another_thread(
    world: FakeWorld, scheduler: Scheduler
) -> None:
    body = new_job(world, name="threaded")
    errors: list[BaseException] = []

    def from_a_thread() -> None:
        try:
            scheduler.observe("ADDED", body)
        except BaseException as err:
            errors.append(err)

    await asyncio.to_thread(from_a_thread)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert uid_of(body) not in scheduler.jobs
    scheduler.observe("ADDED", body)  # on the loop it is taken
    assert uid_of(body) in scheduler.jobs
