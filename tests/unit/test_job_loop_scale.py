"""What keeps a thousand MLJobs cheap: a small job reaches Running in one status write, and its
cursor is written once a second, not once a chunk (pacing and turns: tests/unit/test_scheduler.py).

Over the in-memory fakes (tests/support/fakes); the same behaviour against the real servers is in
test_e2e_idle.py, and its cost is measured by bench/mljob_many.py.
"""

from __future__ import annotations

import pytest

from mljob.api.models import Phase
from mljob.controller.actions import dispatch as dispatch_action
from mljob.controller.loop import JobLoop
from support.fakes import FakeWorld
from support.jobloop import new_job, status, uid_of

pytestmark = pytest.mark.unit


async def test_a_job_that_fits_one_chunk_goes_to_running_in_one_write(world: FakeWorld) -> None:
    body = new_job(world, world.services.settings.dispatch_chunk)  # 4 items: exactly one chunk
    uid = uid_of(body)
    assert not await JobLoop(world.services, body).step()
    writes = [w for w in world.kube.writes if w.uid == uid]
    assert len(writes) == 1, "one status write from nothing to Running"
    shown = status(body)
    assert (shown["phase"], shown["total"], shown["dispatchCursor"], shown["pending"]) == ("Running", 4, 4, 4)
    assert {c["type"]: c["status"] for c in shown["conditions"]} == {
        "ItemsSourceReady": "True",
        "Dispatched": "True",
        "Progressing": "True",
    }
    assert shown["startTime"] and shown["observedGeneration"] == 1
    assert [e.reason for e in world.kube.events_of(uid)] == ["Running"]
    assert world.jobs.records[uid].phase == Phase.RUNNING
    assert world.jobs.records[uid].dispatched == 4, "Postgres knows every task was dispatched"
    loop = JobLoop(world.services, body)
    assert not await loop.step() and not await loop.step()  # the next looks, nothing moved
    assert len([w for w in world.kube.writes if w.uid == uid]) == 1, "and they write nothing"


async def test_a_job_of_several_chunks_still_shows_dispatching_and_its_cursor(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch_action, "DISPATCH_STATUS_INTERVAL_SECONDS", 0.0)  # every chunk
    body = new_job(world, 10)  # 3 chunks of 4
    uid = uid_of(body)
    assert not await JobLoop(world.services, body).step()
    assert world.kube.phases_of(uid) == ["Dispatching", "Running"]
    cursors = [w.after.get("dispatchCursor") for w in world.kube.writes if w.uid == uid]
    assert [c for c in cursors if c][:3] == [4, 8, 10]


async def test_a_fast_dispatch_writes_its_cursor_once_a_second_not_once_a_chunk(world: FakeWorld) -> None:
    """The status write per chunk was a round trip to the apiserver per 1,000 tasks, in line with
    the publishing: now at most one a second, and the last one says every task is published."""
    body = new_job(world, 40)  # 10 chunks of 4, published in well under a second
    uid = uid_of(body)
    assert not await JobLoop(world.services, body).step()
    cursors = [
        w.after["dispatchCursor"] for w in world.kube.writes if w.uid == uid and w.after.get("dispatchCursor")
    ]
    assert cursors[-1] == 40 and len(cursors) < 10, cursors
    assert status(body)["phase"] == "Running"


async def test_a_job_waiting_for_a_dispatch_slot_is_woken_by_the_dispatch_that_frees_one(
    world: FakeWorld,
) -> None:
    """With every slot taken a job joins the line and its own pacing is only a safety net (the
    idle interval, not the reconcile interval); the dispatch that ends wakes the longest waiting."""
    s = world.services
    woken: list[str] = []
    s.manage(managed=s.managed, waker=woken.append)
    first, second = (new_job(world, 4, name=n) for n in ("first", "second"))
    s.managed.update({uid_of(first), uid_of(second)})  # type: ignore[attr-defined]
    waiting = JobLoop(s, second)
    for _ in range(s.settings.max_concurrent_dispatches):
        await s.dispatch_slots.acquire()
    assert await waiting.tick() == s.settings.idle_reconcile_interval
    assert list(s.dispatch_line) == [uid_of(second)] and status(second).get("phase") != Phase.RUNNING
    s.dispatch_slots.release()  # one slot frees: the next dispatch to end hands it on
    assert await JobLoop(s, first).tick() == s.settings.reconcile_interval
    assert status(first)["phase"] == Phase.RUNNING
    assert woken == [uid_of(second)] and not s.dispatch_line
    assert await waiting.tick() == s.settings.reconcile_interval, "dispatched: paced as usual again"
    assert status(second)["phase"] == Phase.RUNNING


async def test_a_job_cancelled_while_in_line_leaves_it(world: FakeWorld) -> None:
    s = world.services
    body = new_job(world, 4)
    s.managed.add(uid_of(body))  # type: ignore[attr-defined]
    loop = JobLoop(s, body)
    for _ in range(s.settings.max_concurrent_dispatches):
        await s.dispatch_slots.acquire()
    await loop.tick()
    assert list(s.dispatch_line) == [uid_of(body)]
    body["spec"]["cancel"] = True
    await loop.tick()
    assert not s.dispatch_line, "a cancelled job does not take the next free slot's turn"
    assert status(body)["phase"] in {Phase.CANCELLED, Phase.CANCELING}
