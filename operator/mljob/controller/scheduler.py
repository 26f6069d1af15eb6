"""One scheduler for every MLJob: an index of slim bodies, a heap of due times, a few workers.

The shape of the Kubernetes Job controller: no task per object. kopf's watch feeds `observe`
(an `@kopf.on.event` handler); each MLJob is a `JobLoop` in the index, holding only what its
decisions use. `core.schedule.DueQueue` orders them by when they are next due: a job's own tick
says when (`reconcile.next_tick`, its deadline, its TTL), and a result, an exhausted item, a watch
event that matters (`core.index.worth_a_look`) makes it due at once. A bounded pool of workers
takes due jobs in order; a job is never reconciled twice at once: woken while it is being
reconciled, it is due again right after. Only the replica that leads (`Leadership`) hands out
work; every replica keeps its index warm from the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from mljob.adapters.services import Services
from mljob.controller.leader import Leadership
from mljob.controller.loop import JobLoop
from mljob.core import index
from mljob.core.schedule import DueQueue
from mljob.ops import logs, metrics

log = logging.getLogger(__name__)

#: How long stop() lets the workers finish the reconciles they are in before cancelling them.
STOP_GRACE_SECONDS = 10.0
#: The most the scheduler waits for the counts of the jobs it hands out together.
OBSERVE_TIMEOUT_SECONDS = 2.0


class Leader(Protocol):
    """What the scheduler needs of leader election (mljob.controller.leader)."""

    leading: asyncio.Event


class Scheduler:
    def __init__(
        self,
        services: Services,
        workers: int,
        leader: Leader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.s = services
        self.workers = workers
        self.leader = leader or Leadership.always()
        self.clock = clock
        #: uid -> the job's loop (its slim body, pacing and last snapshot)
        self.jobs: dict[str, JobLoop] = {}
        self.due: DueQueue[str] = DueQueue()
        #: due jobs handed to the workers, in due order
        self.ready: asyncio.Queue[str] = asyncio.Queue()
        #: jobs a worker holds (handed out or being reconciled), and those woken meanwhile
        self.busy: set[str] = set()
        self.again: set[str] = set()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: names of the workers inside a reconcile (stop() lets those finish)
        self._in_tick: set[str] = set()
        self._stopping = False
        services.manage(self.jobs, self.wake)

    # -- fed by the watch, the collector, the advisory watcher -------------------------------

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A watch event (None: kopf's initial listing). Keeps the slim body; makes the job due at
        once when the event matters; forgets the job once the API server deleted it."""
        asyncio.get_running_loop()  # raises off the event loop's thread: nothing here is thread-safe
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        if not uid:
            return
        if event_type == "DELETED":
            self.forget(uid)
            return
        slim = index.slim(body)
        loop = self.jobs.get(uid)
        if loop is None:
            self.jobs[uid] = JobLoop(self.s, slim)
            self.wake(uid)
            return
        before = loop.view.body
        loop.observe(slim)
        if index.worth_a_look(before, slim):
            self.wake(uid)

    def wake(self, uid: str) -> None:
        """Due now (a job this operator does not manage is ignored)."""
        loop = self.jobs.get(uid)
        if loop is None:
            return
        loop.woken()
        if uid in self.busy:
            self.again.add(uid)
        else:
            self.due.wake(uid, self.clock())
            self._changed.set()

    def forget(self, uid: str) -> None:
        self.jobs.pop(uid, None)
        self.due.remove(uid)
        self.again.discard(uid)
        self.s.heartbeats.forget(uid)
        metrics.JOBS.forget(uid)

    # -- the scheduler task and its workers ---------------------------------------------------

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._feed(), name="mljob-scheduler"))
        for n in range(self.workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"mljob-reconcile-{n}"))

    async def stop(self) -> None:
        """Stop handing out work, let reconciles in progress finish (bounded), cancel the rest."""
        if not self._tasks:
            return
        # A flag, not only cancel(): on Python 3.11 wait_for() can swallow a cancel that comes as
        # its wait ends, and the feeder's wait ends often on a busy operator.
        self._stopping = True
        self._changed.set()
        feeder, workers = self._tasks[0], self._tasks[1:]
        feeder.cancel()
        for worker in workers:
            if not self._reconciling(worker):
                worker.cancel()
        await asyncio.wait(self._tasks, timeout=STOP_GRACE_SECONDS)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _reconciling(self, worker: asyncio.Task[None]) -> bool:
        return worker.get_name() in self._in_tick

    async def _feed(self) -> None:
        """Hand due jobs to free workers, earliest first, while this replica leads."""
        led = False
        while not self._stopping:
            if not self.leader.leading.is_set():
                led = False
                await self.leader.leading.wait()
            if not led:
                led = True
                self._took_over()
            self._changed.clear()
            free = self.workers - len(self.busy)
            now = self.clock()
            if free > 0:
                handed = [uid for uid in self.due.pop_due(now, free) if uid in self.jobs]
                self.busy.update(handed)
                await self._observe_together(handed)
                for uid in handed:
                    self.ready.put_nowait(uid)
            next_at = self.due.next_due()
            metrics.SCHEDULER_JOBS.set(len(self.jobs))
            metrics.SCHEDULER_BUSY.set(len(self.busy))
            metrics.SCHEDULER_LATE.set(max(0.0, now - next_at) if next_at is not None else 0.0)
            timeout = None if next_at is None or len(self.busy) >= self.workers else max(0.0, next_at - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def _observe_together(self, uids: list[str]) -> None:
        """One Redis round trip for the counts of every job handed out at once (a restart, a
        burst of wake-ups, many quiet jobs due together) instead of one per job. Best effort:
        when Redis does not answer in time each tick reads its own, and handles the outage."""
        observed = [uid for uid in uids if self.jobs[uid].wants_counts()]
        if len(observed) < 2:
            return
        try:
            counts = await asyncio.wait_for(self.s.state.counts_many(observed), OBSERVE_TIMEOUT_SECONDS)
        except Exception as err:
            log.debug("reading the counts of %d jobs at once failed: %s", len(observed), err)
            return
        for uid, found in counts.items():
            loop = self.jobs.get(uid)
            if loop is not None:
                loop.prefetched(found)

    def _took_over(self) -> None:
        """This replica leads from now on (at start, or after another's lease ran out): every
        job is due at once, and none counts the time before as a stall (it was watched, not
        worked on)."""
        now = self.clock()
        for uid, loop in self.jobs.items():
            loop.watch_afresh()
            self.due.wake(uid, now)

    async def _work(self) -> None:
        name = asyncio.current_task().get_name()  # type: ignore[union-attr]
        while not self._stopping:
            uid = await self.ready.get()
            loop = self.jobs.get(uid)
            delay: float | None = None
            if loop is not None:
                self._in_tick.add(name)
                try:
                    ref = loop.view.ref
                    with logs.job_context(ref.namespace, ref.name, ref.uid):
                        delay = await loop.tick()
                finally:
                    self._in_tick.discard(name)
            self._done(uid, delay)

    def _done(self, uid: str, delay: float | None) -> None:
        self.busy.discard(uid)
        if uid not in self.jobs:
            self.again.discard(uid)
        elif uid in self.again:
            self.again.discard(uid)
            self.due.wake(uid, self.clock())
        elif delay is not None:
            self.due.schedule(uid, self.clock() + delay)
        self._changed.set()
