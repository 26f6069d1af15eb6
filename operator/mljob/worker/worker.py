"""The worker: follows the registry, shares its capacity round-robin across active jobs, stops cleanly.

Fairness (docs/protocol.md, "Fairness"): one dispatcher serves the pipeline's active jobs in
turn. Each turn asks one job for at most min(batch, its share of the free slots) tasks with a
no_wait pull, then moves that job to the back of the rotation; a job that just got a turn goes
behind every other job, so a small job registered after a huge one gets every other free slot
instead of waiting for the huge one to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import OrderedDict
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from mljob import natsconn, protocol
from mljob.worker.config import WorkerConfig
from mljob.worker.handler import Handler, load_handler
from mljob.worker.outcome import describe
from mljob.worker.puller import JobPuller, PullError
from mljob.worker.registry_watch import RegistryWatcher
from mljob.worker.runner import JobBinding, TaskRunner
from mljob.worker.slots import Slots

log = logging.getLogger(__name__)

IDLE_POLL_MIN_SECONDS = 0.02
REBIND_AFTER_SECONDS = 5.0
SHUTDOWN_NAK_WAIT_SECONDS = 5.0


class _ActiveJob:
    """A registered job as the dispatcher sees it."""

    def __init__(self, entry: protocol.RegistryEntry) -> None:
        self.entry = entry
        self.binding: JobBinding | None = None
        self.puller: JobPuller | None = None
        self.retry_bind_at = 0.0
        self.last_problem: str | None = None
        #: Whether the last fetch returned tasks (jobs believed empty do not dilute the shares).
        self.had_work = True

    @property
    def uid(self) -> str:
        return self.entry.uid

    def same_consumer(self, entry: protocol.RegistryEntry) -> bool:
        return (self.entry.stream, self.entry.consumer) == (entry.stream, entry.consumer)


class Worker:
    """Runs a handler over the tasks of every active job of one pipeline."""

    def __init__(self, config: WorkerConfig, handler: Handler | str) -> None:
        self.config = config
        self.handler: Handler = load_handler(handler) if isinstance(handler, str) else handler
        self._jobs: OrderedDict[str, _ActiveJob] = OrderedDict()
        self._slots = Slots(config.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._stop_requested = asyncio.Event()
        self._hurry = asyncio.Event()
        self._wake = asyncio.Event()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._runner: TaskRunner | None = None

    # ---------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        """Stop fetching and shut down (call on the worker's loop; signal handlers do).

        In-flight tasks get `grace_seconds` to finish, then are NAKed. A second call NAKs them now.
        """
        if self._stop_requested.is_set():
            if not self._hurry.is_set():
                log.warning("second stop request: NAK the tasks in flight now")
                self._hurry.set()
            return
        log.info("stop requested: no more fetching, %d task(s) in flight", len(self._tasks))
        self._stop_requested.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def active_jobs(self) -> list[str]:
        return list(self._jobs)

    async def run(self) -> None:
        """Connect, work until `stop()`, then shut down cleanly."""
        connect = asyncio.create_task(self._connect())
        stopped = asyncio.create_task(self._stop_requested.wait())
        await asyncio.wait({connect, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connect
            return
        nc, js = connect.result()
        self._nc, self._js = nc, js
        self._runner = TaskRunner(
            self.handler,
            self._publish,
            self.config.worker_id,
            publish_attempts=self.config.publish_attempts,
            publish_backoff=self.config.publish_backoff_seconds,
            ack_timeout=self.config.ack_timeout_seconds,
            announce=self._announce,
        )
        watcher = RegistryWatcher(js, self.config.pipeline, self._job_added, self._job_removed, self._uids)
        background = [
            asyncio.create_task(watcher.run(), name="mljob-registry-watch"),
            asyncio.create_task(self._dispatch(), name="mljob-dispatch"),
        ]
        log.info(
            "worker %s serving pipeline %s (concurrency %d, batch %d)",
            self.config.worker_id,
            self.config.pipeline,
            self.config.concurrency,
            self.config.batch,
        )
        crashed: BaseException | None = None
        try:
            stop_wait = asyncio.create_task(self._stop_requested.wait())
            done, _ = await asyncio.wait({stop_wait, *background}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            for task in background:
                if task in done and not task.cancelled() and task.exception() is not None:
                    crashed = task.exception()
                    log.error("%s stopped unexpectedly: %s", task.get_name(), describe(crashed))  # type: ignore[arg-type]
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._finish_in_flight()
            for job in list(self._jobs.values()):
                await self._close_job(job)
            if self._closing:
                await asyncio.gather(*self._closing, return_exceptions=True)
            await self._close_connection()
            log.info("worker %s stopped", self.config.worker_id)
        if crashed is not None:
            raise RuntimeError(f"worker failed: {describe(crashed)}") from crashed

    async def _connect(self) -> tuple[Client, JetStreamContext]:
        """NATS through the shared helper: first connection retried, one line per failure cause."""
        where = natsconn.redact(self.config.nats_url)
        nc = await natsconn.connect(
            self.config,
            name=f"mljob-worker {self.config.worker_id}",
            log=log,
            report=natsconn.once_per_cause(log, f"cannot reach NATS at {where}"),
            initial_delay=0.5,
            max_delay=5.0,
        )  # run() cancels this on stop
        assert nc is not None  # without a stop event, connect returns only once connected
        return nc, nc.jetstream()

    async def _close_connection(self) -> None:
        if self._nc is None:
            return
        try:
            await self._nc.flush(timeout=2)  # the NAKs above must reach the server
        except Exception as err:
            log.warning("flushing the NATS connection failed: %s", describe(err))
        with contextlib.suppress(Exception):
            await self._nc.close()

    async def _finish_in_flight(self) -> None:
        pending: set[asyncio.Task[Any]] = set(self._tasks)
        if not pending:
            return
        grace = self.config.grace_seconds
        log.info("waiting up to %.1fs for %d task(s) in flight", grace, len(pending))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        hurry: asyncio.Task[Any] = asyncio.create_task(self._hurry.wait())
        while pending and not self._hurry.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            _, pending = await asyncio.wait(
                pending | {hurry}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(hurry)
        hurry.cancel()
        if pending:
            log.warning("NAK %d unfinished task(s) for immediate redelivery", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=SHUTDOWN_NAK_WAIT_SECONDS)

    # ---------------------------------------------------------------- registry

    def _uids(self) -> set[str]:
        return set(self._jobs)

    async def _job_added(self, entry: protocol.RegistryEntry) -> None:
        current = self._jobs.get(entry.uid)
        if current is not None:
            if current.same_consumer(entry):
                current.entry = entry
                return
            await self._job_removed(entry.uid)
        self._jobs[entry.uid] = _ActiveJob(entry)
        log.info("job %s/%s (%s) is active", entry.namespace, entry.name, entry.uid)
        self._wake.set()

    async def _job_removed(self, uid: str) -> None:
        job = self._jobs.pop(uid, None)
        if job is None:
            return
        log.info(
            "job %s/%s (%s) left the registry: no more fetching from it",
            job.entry.namespace,
            job.entry.name,
            uid,
        )
        task = asyncio.create_task(self._close_job(job))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_job(self, job: _ActiveJob) -> None:
        puller, job.puller, job.binding = job.puller, None, None
        if puller is None:
            return
        returned = await puller.close()
        if returned:
            log.info("NAKed %d fetched task(s) of job %s that were never started", returned, job.uid)

    # ---------------------------------------------------------------- dispatch

    async def _dispatch(self) -> None:
        idle = IDLE_POLL_MIN_SECONDS
        while True:
            await self._slots.wait_free()
            try:
                fetched = await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.error("dispatch round failed: %s", describe(err))
                fetched = 0
            if fetched:
                idle = IDLE_POLL_MIN_SECONDS
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), idle)
            idle = min(idle * 2, self.config.idle_poll_max_seconds)

    async def _round(self) -> int:
        """One pass over the rotation; returns how many tasks were started."""
        started = 0
        jobs = list(self._jobs.values())
        for job in jobs:
            if self._stop_requested.is_set() or self._slots.free <= 0:
                break
            if self._jobs.get(job.uid) is not job:
                continue
            self._jobs.move_to_end(job.uid)
            binding = await self._ensure_bound(job)
            if binding is None or job.puller is None:
                continue
            with_work = max(1, sum(1 for j in jobs if j.had_work))
            want = min(self.config.batch, max(1, self._slots.free // with_work))
            try:
                msgs = await job.puller.fetch(want)
            except PullError as err:
                self._problem(job, str(err))
                await self._close_job(job)
                job.retry_bind_at = asyncio.get_running_loop().time() + REBIND_AFTER_SECONDS
                continue
            except Exception as err:
                self._problem(job, f"fetch failed: {describe(err)}")
                continue
            job.last_problem = None
            job.had_work = bool(msgs)
            if self._stop_requested.is_set() or self._jobs.get(job.uid) is not job:
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.nak()
                continue
            for msg in msgs:
                self._start(binding, msg)
            started += len(msgs)
        return started

    def _start(self, binding: JobBinding, msg: Msg) -> None:
        assert self._runner is not None
        self._slots.take()
        task = asyncio.create_task(self._runner.process(binding, msg))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _ensure_bound(self, job: _ActiveJob) -> JobBinding | None:
        if job.binding is not None and job.puller is not None:
            return job.binding
        assert self._js is not None and self._nc is not None
        loop = asyncio.get_running_loop()
        if loop.time() < job.retry_bind_at:
            return None
        entry = job.entry
        try:
            info = await self._js.consumer_info(entry.stream, entry.consumer)
        except Exception as err:
            self._problem(job, f"cannot read consumer {entry.stream}/{entry.consumer}: {describe(err)}")
            job.retry_bind_at = loop.time() + REBIND_AFTER_SECONDS
            return None
        ack_wait = float(info.config.ack_wait or self.config.default_ack_wait_seconds)
        max_deliver = int(info.config.max_deliver or -1)
        puller = JobPuller(self._nc, entry.stream, entry.consumer)
        await puller.start()
        if self._jobs.get(job.uid) is not job:  # removed while binding
            await puller.close()
            return None
        job.binding = JobBinding(entry=entry, ack_wait=ack_wait, max_deliver=max_deliver)
        job.puller = puller
        log.info("pulling tasks of job %s (ack_wait %.0fs, max_deliver %d)", job.uid, ack_wait, max_deliver)
        return job.binding

    def _problem(self, job: _ActiveJob, text: str) -> None:
        """Log a job's problem once, not on every turn of the rotation."""
        if text != job.last_problem:
            log.warning("job %s: %s", job.uid, text)
            job.last_problem = text

    async def _announce(self, subject: str) -> None:
        assert self._nc is not None
        await self._nc.publish(subject, b"")

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> Any:
        assert self._js is not None
        return await self._js.publish(
            subject, body, timeout=self.config.publish_timeout_seconds, headers=headers
        )


def run_worker(handler: Handler | str, config: WorkerConfig) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the process exit status (0 on a clean stop)."""
    worker = Worker(config, handler)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    try:
        asyncio.run(main())
    except (OSError, NatsError) as err:
        log.error("worker failed: %s", describe(err))
        return 1
    except RuntimeError as err:
        log.error("%s", err)
        return 1
    return 0
