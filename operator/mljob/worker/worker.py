"""The worker: follows the registry, shares its capacity round-robin across active jobs, stops cleanly.

Fairness (docs/protocol.md, "Fairness"): one dispatcher serves the pipeline's active jobs in
turn. Each turn asks one job for at most min(batch, its share of the free slots) tasks with a
no_wait pull, then moves that job to the back of the rotation; a job that just got a turn goes
behind every other job, so a small job registered after a huge one gets every other free slot
instead of waiting for the huge one to drain.

A plain handler runs each fetched task at once (one slot, one handler call). A batch handler's
tasks are gathered per job into batches (batching.py); `concurrency` then counts handler calls,
and the worker holds up to `concurrency` x batch size tasks. Either way, results go out in
groups through one ResultPublisher (results.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from mljob import protocol
from mljob.transport import natsconn
from mljob.transport.jspublish import Outgoing, publish_confirmed
from mljob.transport.jspull import JobPuller, PullError
from mljob.worker.batching import BatchAssembler, Quarantine, is_redelivery
from mljob.worker.config import WorkerConfig
from mljob.worker.handler import Handler, batch_spec, load_handler
from mljob.worker.outcome import describe
from mljob.worker.registry_watch import RegistryWatcher
from mljob.worker.results import ResultPublisher, settle_bound
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
        self.assembler: BatchAssembler | None = None
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
        spec = batch_spec(self.handler)
        #: (batch size, filling wait) of a batch handler; None for a plain handler.
        self.batching = spec.resolved(config.batch_size, config.batch_wait_seconds) if spec else None
        per_call = self.batching[0] if self.batching else 1
        self._jobs: OrderedDict[str, _ActiveJob] = OrderedDict()
        self._slots = Slots(config.concurrency * per_call)
        self._calls = asyncio.Semaphore(config.concurrency)
        self._quarantine = Quarantine(self._slots)
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
        log.info("stop requested: no more fetching, %d task(s) in flight", self._slots.used)
        self._stop_requested.set()

    @property
    def in_flight(self) -> int:
        """Tasks fetched and not yet settled."""
        return self._slots.used

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
        results = self._result_publisher(nc, js)
        self._runner = TaskRunner(self.handler, results, self.config.worker_id, announce=self._announce)
        watcher = RegistryWatcher(js, self.config.pipeline, self._job_added, self._job_removed, self._uids)
        publishing = asyncio.create_task(results.run(), name="mljob-results")
        background = [
            asyncio.create_task(watcher.run(), name="mljob-registry-watch"),
            asyncio.create_task(self._dispatch(), name="mljob-dispatch"),
        ]
        log.info(
            "worker %s serving pipeline %s (concurrency %d, batch %d%s)",
            self.config.worker_id,
            self.config.pipeline,
            self.config.concurrency,
            self.config.batch,
            f", batch handler: up to {self.batching[0]} tasks per call, {self.batching[1]:g}s to fill one"
            if self.batching
            else "",
        )
        crashed: BaseException | None = None
        try:
            stop_wait = asyncio.create_task(self._stop_requested.wait())
            watched = {stop_wait, publishing, *background}
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            for task in (publishing, *background):
                if task in done and not task.cancelled() and task.exception() is not None:
                    crashed = task.exception()
                    log.error("%s stopped unexpectedly: %s", task.get_name(), describe(crashed))  # type: ignore[arg-type]
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for job in list(self._jobs.values()):
                if job.assembler is not None:
                    job.assembler.flush()  # fetched before the stop: in flight like the others
            await self._finish_in_flight()
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            for job in list(self._jobs.values()):
                await self._close_job(job)
            if self._closing:
                await asyncio.gather(*self._closing, return_exceptions=True)
            await self._close_connection()
            log.info("worker %s stopped", self.config.worker_id)
        if crashed is not None:
            raise RuntimeError(f"worker failed: {describe(crashed)}") from crashed

    def _result_publisher(self, nc: Client, js: JetStreamContext) -> ResultPublisher:
        config = self.config

        async def publish_many(messages: Sequence[Outgoing]) -> dict[int, BaseException]:
            return await publish_confirmed(js, messages, timeout=config.publish_timeout_seconds)

        async def flush() -> None:
            await nc.flush(timeout=config.ack_timeout_seconds)  # type: ignore[arg-type]

        bound = settle_bound(
            config.publish_attempts,
            config.publish_backoff_seconds,
            config.publish_timeout_seconds,
            config.ack_timeout_seconds,
            config.publish_patience_seconds,
        )
        return ResultPublisher(
            publish_many,
            flush,
            attempts=config.publish_attempts,
            backoff=config.publish_backoff_seconds,
            patience=config.publish_patience_seconds,
            wait_bound=bound,
        )

    async def _connect(self) -> tuple[Client, JetStreamContext]:
        """NATS through the shared helper: first connection retried, one line per failure cause;
        refused credentials raise natsconn.CannotStart (the worker exits, see run_worker)."""
        nc = await natsconn.connect(
            self.config,
            name=f"mljob-worker {self.config.worker_id}",
            log=log,
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
        log.info("waiting up to %.1fs for %d task(s) in flight", grace, self._slots.used)
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
            log.warning("NAK %d unfinished task(s) for immediate redelivery", self._slots.used)
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
        unstarted = job.assembler.take() if job.assembler is not None else []
        job.assembler = None
        for msg in unstarted:
            with contextlib.suppress(Exception):
                await msg.nak()
        if unstarted:
            self._slots.release(len(unstarted))
        returned = (await puller.close()) if puller is not None else 0
        if returned + len(unstarted):
            log.info(
                "NAKed %d fetched task(s) of job %s that were never started",
                returned + len(unstarted),
                job.uid,
            )

    # ---------------------------------------------------------------- dispatch

    async def _dispatch(self) -> None:
        idle = IDLE_POLL_MIN_SECONDS
        while True:
            await self._quarantine.wait_empty()  # a redelivered task runs alone: fetch nothing meanwhile
            await self._slots.wait_free()
            self._wake.clear()  # before the round: a wake-up during the round starts the next one
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), idle)
            idle = min(idle * 2, self.config.idle_poll_max_seconds)

    async def _round(self) -> int:
        """One pass over the rotation; returns how many tasks were fetched."""
        fetched = 0
        jobs = list(self._jobs.values())
        for job in jobs:
            if self._stop_requested.is_set() or self._slots.free <= 0 or self._quarantine.held:
                break
            if self._jobs.get(job.uid) is not job:
                continue
            self._jobs.move_to_end(job.uid)
            binding = await self._ensure_bound(job)
            if binding is None or job.puller is None:
                continue
            with_work = max(1, sum(1 for j in jobs if j.had_work))
            per_turn = max(self.config.batch, self.batching[0]) if self.batching else self.config.batch
            want = min(per_turn, max(1, self._slots.free // with_work))
            try:
                msgs = await self._fetch(job.puller, want)
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
            self._start(job, binding, msgs)
            fetched += len(msgs)
        if self.batching and (self._slots.free <= 0 or self._quarantine.held):
            for job in self._jobs.values():  # nothing more can come: do not wait to fill batches
                if job.assembler is not None:
                    job.assembler.flush()
        return fetched

    async def _fetch(self, puller: JobPuller, want: int) -> list[Msg]:
        """A plain handler's turn is one fetch. A batch handler's asks for one task first, and
        stops there when it is a redelivery (JetStream serves those first): see batching.py."""
        if not self.batching or want <= 1:
            return await puller.fetch(want)
        first = await puller.fetch(1)
        if not first or is_redelivery(first[0]):
            return first
        try:
            return first + await puller.fetch(want - 1)
        except Exception as err:  # the task in hand still runs; the next turn meets the error again
            log.debug("second fetch of a turn failed: %s", describe(err))
            return first

    def _start(self, job: _ActiveJob, binding: JobBinding, msgs: list[Msg]) -> None:
        assert self._runner is not None
        self._slots.take(len(msgs))
        if not self.batching:
            for msg in msgs:
                self._track(self._runner.process(binding, msg), 1)
            return
        if job.assembler is None:
            size, wait = self.batching
            wait = min(wait, binding.ack_wait / 3)  # gathered tasks do not heartbeat yet
            job.assembler = BatchAssembler(size, wait, lambda batch: self._start_batch(binding, batch))
        for msg in msgs:
            if is_redelivery(msg):
                self._quarantine.admit()
                self._track(self._runner.process_batch(binding, [msg], self._quarantine.alone()), 1, True)
            else:
                job.assembler.add([msg])

    def _start_batch(self, binding: JobBinding, batch: list[Msg]) -> None:
        assert self._runner is not None
        self._track(self._runner.process_batch(binding, batch, self._calls), len(batch))

    def _track(self, work: Any, slots: int, redelivered: bool = False) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if redelivered:
                self._quarantine.release()
            self._slots.release(slots)

        task.add_done_callback(done)

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
    except natsconn.CannotStart as err:  # e.g. NATS refused the credentials: retrying cannot help
        log.error("%s", err)
        return 1
    except (OSError, NatsError) as err:
        log.error("worker failed: %s", describe(err))
        return 1
    except RuntimeError as err:
        log.error("%s", err)
        return 1
    return 0
