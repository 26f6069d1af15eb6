"""`JobLoop.run` under kopf's own stop flag: what kopf hands a daemon as `stopped`.

The loop's ticks are tested in test_job_loop.py; this is the shell around them: it must read
kopf's flag the way kopf defines it (a deletion is told apart from the operator exiting by the
flag's reason), so the last cleanup after a deletion really runs.
"""
# The fixtures clock and world are imported from test_job_loop, and pytest finds a fixture by the
# module attribute's name, so the test parameters must shadow those imports:
# ruff: noqa: F811

from __future__ import annotations

import asyncio

import kopf
import pytest
from kopf._cogs.aiokits.aioenums import AsyncFlagWaiter, FlagSetter
from test_job_loop import PIPELINE, clock, new_job, running, uid_of, world  # noqa: F401

from mljob import protocol
from support.fakes import FakeWorld

pytestmark = pytest.mark.unit


def kopf_stop_flag() -> tuple[
    FlagSetter[kopf.DaemonStoppingReason], AsyncFlagWaiter[kopf.DaemonStoppingReason]
]:
    """kopf's pair: the setter it keeps, the read-only waiter an async daemon gets as `stopped`."""
    setter: FlagSetter[kopf.DaemonStoppingReason] = FlagSetter()
    return setter, AsyncFlagWaiter(setter)


def leftovers(world: FakeWorld, uid: str) -> dict[str, bool]:
    stream = world.js.streams.get(protocol.task_stream(PIPELINE))
    return {
        "consumer": stream is not None and protocol.task_consumer(uid) in stream.consumers,
        "registry": protocol.registry_key(PIPELINE, uid) in world.registry.entries,
        "redis": uid in world.state.jobs,
    }


@pytest.mark.parametrize(
    ("reason", "cleaned"),
    [
        (kopf.DaemonStoppingReason.RESOURCE_DELETED, True),  # the MLJob is gone: clean up once more
        (kopf.DaemonStoppingReason.OPERATOR_EXITING, False),  # a restart: the job lives on
    ],
)
async def test_run_ends_on_kopfs_flag_and_cleans_up_only_after_a_deletion(
    world: FakeWorld, reason: kopf.DaemonStoppingReason, cleaned: bool
) -> None:
    body = new_job(world, 10)
    uid = uid_of(body)
    loop = await running(world, body)
    assert leftovers(world, uid) == {"consumer": True, "registry": True, "redis": True}
    setter, stopped = kopf_stop_flag()
    task = asyncio.create_task(loop.run(stopped, asyncio.Event()))
    await asyncio.sleep(0.05)  # a few ticks of the running job
    assert not task.done()
    setter.set(reason=reason)
    await asyncio.wait_for(task, 5)  # raises what run() raised
    expected = not cleaned
    assert leftovers(world, uid) == {"consumer": expected, "registry": expected, "redis": expected}
