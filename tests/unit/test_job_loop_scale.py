"""What keeps a thousand MLJobs cheap: a small job reaches Running in one status write, and a
quiet job's loop looks at it less and less often until something moves.

Over the in-memory fakes (tests/support/fakes); the same behaviour against the real servers is in
test_e2e_idle.py, and its cost is measured by bench/mljob_many.py.
"""
# The fixtures clock and world are imported from test_job_loop, and pytest finds a fixture by the
# module attribute's name, so the test parameters must shadow those imports:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import kopf
import pytest
from test_job_loop import clock, new_job, running, status, uid_of, world  # noqa: F401
from test_job_loop_run import kopf_stop_flag

from mljob.api.models import Phase
from mljob.controller.actions import dispatch as dispatch_action
from mljob.controller.loop import JobLoop
from support.fakes import FakeWorld

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
    }
    assert shown["startTime"] and shown["observedGeneration"] == 1
    assert [e.reason for e in world.kube.events_of(uid)] == ["Running"]
    assert world.jobs.records[uid].phase == Phase.RUNNING
    assert world.jobs.records[uid].dispatched == 4, "Postgres knows every task was dispatched"


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


async def test_a_quiet_job_is_looked_at_less_often_until_woken(world: FakeWorld) -> None:
    world.services.settings.reconcile_interval = 0.01
    world.services.settings.idle_reconcile_interval = 0.16
    body = new_job(world, 10)
    loop = await running(world, body)
    steps: list[float] = []
    step = loop.step

    async def counted() -> bool:
        steps.append(asyncio.get_running_loop().time())
        return await step()

    loop.step = counted  # type: ignore[method-assign]
    setter, stopped = kopf_stop_flag()
    wake = asyncio.Event()
    task = asyncio.create_task(loop.run(stopped, wake))
    await asyncio.sleep(1.0)
    # Every 0.01 s that is about 100 ticks; doubling to 0.16 s: 0.01+0.02+0.04+0.08, then 0.16.
    quiet = len(steps)
    assert 4 <= quiet <= 12, steps
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert max(gaps) >= 0.15 and gaps[-1] < 0.3, gaps

    await world.work(uid_of(body), 3)  # results arrive, and the collector wakes the loop
    wake.set()
    await asyncio.sleep(0.05)
    assert len(steps) >= quiet + 2, "woken, the loop looks again at once and then at the short interval"
    setter.set(reason=kopf.DaemonStoppingReason.OPERATOR_EXITING)
    await asyncio.wait_for(task, 5)
    assert status(body)["processed"] == 3


async def test_thousands_of_new_jobs_dispatch_a_few_at_a_time(world: FakeWorld) -> None:
    """Ten thousand MLJobs created together all registered their items at once and queued on
    the Postgres pool until its waits timed out; the loops now take turns."""
    world.services.dispatch_slots = asyncio.Semaphore(3)
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
    await asyncio.gather(*(JobLoop(world.services, body).step() for body in bodies))
    assert peak == 3
    assert {status(body)["phase"] for body in bodies} == {"Running"}
