"""The operator's process-wide work besides the per-job loops, started and stopped together.

- wake-ups: the collector's `drained` event wakes a job's loop, so a verdict lands at once;
- heartbeats: workers busy on long tasks say so, so such a job is not stalled (row 5);
- the results collector, unless it runs as its own Deployment (`--no-collector`), on a NATS
  connection of its own: on the operator's, its fetches and acks queued behind dispatch's
  thousands of outstanding publishes (a round trip of a second or more each), so results
  were barely stored while a big job dispatched;
- exhausted deliveries: items NATS gave up on are failed within seconds (rows 2, 3);
- the orphan sweep: streams, registry entries and keys no live MLJob owns (row 13).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.services import Services
from mljob.collector.results import Collector
from mljob.controller.exhausted import ExhaustedDeliveries
from mljob.controller.sweep import run_sweeper
from mljob.transport import natsconn

log = logging.getLogger(__name__)

#: How long shutdown waits for the background tasks to finish their current batch.
STOP_TIMEOUT_SECONDS = 10.0
#: How long a cancelled task may take to unwind (its `finally` clauses) before shutdown goes on.
CANCEL_TIMEOUT_SECONDS = 5.0


def _uid_of(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


@dataclass
class Background:
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: seconds the tasks get to finish their current batch once asked to stop
    grace: float = STOP_TIMEOUT_SECONDS
    #: connections of the background's own (the collector's), closed once the tasks are done
    connections: list[NATS] = field(default_factory=list)

    async def stop(self) -> None:
        """Ask every task to stop, give them `grace` to finish their batch, cancel the rest and
        wait for them: the caller closes the connections they use right after."""
        self.stop_event.set()
        try:
            await self._stop_tasks()
        finally:
            for nc in self.connections:
                try:
                    await nc.drain()
                except Exception as err:
                    log.warning("error while closing the collector's NATS connection: %s", err)

    async def _stop_tasks(self) -> None:
        if not self.tasks:
            return
        _, late = await asyncio.wait(self.tasks, timeout=self.grace)
        for task in late:
            log.warning("%s did not stop within %gs; cancelling it", task.get_name(), self.grace)
            task.cancel()
        if late:
            _, stuck = await asyncio.wait(late, timeout=CANCEL_TIMEOUT_SECONDS)
            for task in stuck:
                log.error("%s is still running after being cancelled", task.get_name())
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("%s failed: %s", task.get_name(), task.exception())


async def start(services: Services) -> Background:
    background = Background()

    async def on_drained(msg: Any) -> None:
        services.wake(_uid_of(msg.subject))

    async def on_heartbeat(msg: Any) -> None:
        services.heartbeats.record(_uid_of(msg.subject), time.time())

    await services.nc.subscribe(f"{protocol.DRAINED_SUBJECT_PREFIX}.*", cb=on_drained)
    await services.nc.subscribe(f"{protocol.HEARTBEAT_SUBJECT_PREFIX}.*.*", cb=on_heartbeat)
    stop = background.stop_event
    replicas = services.settings.stream_replicas
    if services.settings.run_collector:
        nc = await natsconn.connect(services.settings, name="mljob-operator-collector", log=log)
        assert nc is not None  # no stop event: connect returns only once connected
        background.connections.append(nc)
        collector = Collector(
            nc.jetstream(),
            nc,
            services.state,
            services.results,
            batch=services.settings.collector_batch,
            loops=services.settings.collector_loops,
            ensure=lambda: jetstream.ensure_results_stream(services.js, replicas),
        )
        background.tasks.append(asyncio.create_task(collector.run(stop), name="mljob-collector"))
    exhausted = ExhaustedDeliveries(
        services.js,
        services.nc,
        services.results,
        services.state,
        services.wake,
        ensure=lambda: jetstream.ensure_advisory_stream(services.js, replicas),
    )
    background.tasks.append(asyncio.create_task(exhausted.run(stop), name="mljob-exhausted-deliveries"))
    background.tasks.append(asyncio.create_task(run_sweeper(services, stop), name="mljob-orphan-sweep"))
    return background
