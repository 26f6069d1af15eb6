"""Shutdown of the operator's background work, against REAL NATS, Redis and Postgres.

The connections are closed right after `Background.stop`, so no background task may still be
running when it returns: one that did not finish its batch in time is cancelled and awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import kopf
import pytest
from kubernetes import config as kube_config

from mljob.adapters.kube import Kube
from mljob.adapters.services import Services
from mljob.controller import background, handlers
from mljob.controller.scheduler import Scheduler
from mljob.settings import OperatorSettings
from mljob_dev.chaos import open_services
from support.stack import StackEnv


@pytest.fixture
async def services(stack: StackEnv, pg_schema: str, prefix: str) -> AsyncIterator[Services]:
    settings = OperatorSettings(
        nats_url=stack.nats_url,
        redis_url=stack.redis_url,
        postgres_dsn=stack.postgres_dsn,
        postgres_schema=pg_schema,
        redis_prefix=prefix,
        orphan_sweep_interval=3600,
    )
    kube = Kube(kube_config.new_client_from_config(config_file=stack.kubeconfig))
    yield await open_services(settings, kube)


async def test_shutdown_cancels_a_background_task_that_outlives_its_grace_before_closing(
    services: Services,
) -> None:
    running = await background.start(services)
    started = asyncio.Event()
    unwound: list[str] = []

    async def long_query() -> None:
        """A background task in the middle of a Postgres call that does not look at the stop flag."""
        try:
            async with services.pool.connection() as conn:
                started.set()
                await conn.execute("SELECT pg_sleep(600)")
        finally:
            unwound.append("long query")

    stuck = asyncio.create_task(long_query(), name="mljob-test-long-query")
    running.tasks.append(stuck)
    await asyncio.wait_for(started.wait(), 30)  # a bound against a hang, not a timing

    running.grace = 0.5  # the real tasks stop at once; the stuck one would run for 10 minutes
    scheduler = Scheduler(services, workers=2)
    scheduler.start()
    await handlers.shutdown(memo=kopf.Memo(scheduler=scheduler, background=running, services=services))

    assert stuck.cancelled() and unwound == ["long query"]
    assert scheduler._tasks == [], "the scheduler stopped first: no reconcile after the stores closed"
    # the collector's NATS connection is its own (never queued behind dispatch), closed with it
    assert [c is not services.nc for c in running.connections] == [True]
    assert running.connections[0].is_closed
    assert all(task.done() for task in running.tasks), [t.get_name() for t in running.tasks if not t.done()]
    assert services.pool.closed


async def test_a_task_that_stops_in_time_ends_normally() -> None:
    running = background.Background(grace=30)

    async def polite() -> None:
        await running.stop_event.wait()

    task = asyncio.create_task(polite())
    running.tasks.append(task)
    await running.stop()
    assert task.done() and not task.cancelled()
