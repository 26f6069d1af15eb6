"""Tasks start to finish: decode, handler (one task, or a batch of one job's tasks), then the outcome.

Rules (docs/protocol.md, "Acknowledgement rules"):
- the result is published with a JetStream ack (durable) BEFORE the task is ACKed (results.py
  publishes them in groups); a crash in between means redelivery, and the re-published result
  carries the same `Nats-Msg-Id`, so the results stream and the collector count it once;
- a task is always settled: ACK (a result was recorded), NAK (try again), or TERM (unusable and
  not attributable to any item). Never left to time out, except when the process dies.
- a task of a protocol version this worker does not speak is refused: a failed result naming the
  reason (when its job uid and item id can be recovered), then TERM, since no redelivery to a
  worker of this version can do better.
- a batch handler's call is one handler call for all its tasks: an exception it raises counts
  for each of them as if a plain handler had raised it; an exception instance in its returned
  list counts for that task alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from mljob import protocol
from mljob.worker import outcome
from mljob.worker.context import TaskContext
from mljob.worker.handler import call_handler
from mljob.worker.outcome import Decision, Publish, Refuse, Retry
from mljob.worker.results import CRASH_AFTER_RESULT_ENV, ResultPublisher
from mljob.worker.taskmsg import (
    Announcer,
    HeartbeatLog,
    TaskMsg,
    delivery_count,
    heartbeat,
    heartbeat_interval,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobBinding:
    """What the runner needs to know about the job a task came from."""

    entry: protocol.RegistryEntry
    ack_wait: float
    max_deliver: int


class BatchShapeError(Exception):
    """A batch handler returned something other than one outcome per task."""


@contextlib.asynccontextmanager
async def _no_gate() -> AsyncIterator[None]:
    yield


class TaskRunner:
    def __init__(
        self,
        handler: Callable[[Any], Any],
        results: ResultPublisher,
        worker_id: str,
        *,
        announce: Announcer | None = None,
    ) -> None:
        self.handler = handler
        self.results = results
        self.worker_id = worker_id
        self.announce = announce
        self.heartbeats = HeartbeatLog()

    # ------------------------------------------------------------------ entry points

    async def process(self, job: JobBinding, msg: Msg) -> None:
        """Run one task through a plain handler; NAK it when cancelled (the worker is stopping)."""
        await self._run(job, [msg], self._one, _no_gate())

    async def process_batch(
        self, job: JobBinding, msgs: Sequence[Msg], gate: AbstractAsyncContextManager[Any] | None = None
    ) -> None:
        """Run tasks of one job through one batch handler call, entered under `gate` (the
        worker's limit of calls at once); they heartbeat from the start, gate wait included."""
        await self._run(job, msgs, self._batch, gate or _no_gate())

    async def _run(
        self,
        job: JobBinding,
        msgs: Sequence[Msg],
        decide: Callable[[JobBinding, list[TaskMsg]], Any],
        gate: AbstractAsyncContextManager[Any],
    ) -> None:
        tasks = [TaskMsg(m) for m in msgs]
        # The heartbeat starts only for tasks still running after one interval: a timer costs a
        # fraction of a task created and cancelled for each of thousands of quick tasks a second.
        interval = heartbeat_interval(job.ack_wait)
        beating: list[asyncio.Task[None]] = []

        def start_beating() -> None:
            beat = heartbeat(tasks, interval, job.entry, self.announce, self.heartbeats, first=0.0)
            beating.append(asyncio.create_task(beat))

        timer = asyncio.get_running_loop().call_later(interval, start_beating)
        try:
            async with gate:
                decisions: list[Decision] = await decide(job, tasks)
            await self._carry_out(job, tasks, decisions)
        except asyncio.CancelledError:
            for task in tasks:
                await task.nak()
            raise
        except Exception as err:  # a bug here must not strand the tasks or kill the loop
            log.error("unexpected error processing tasks of job %s: %s", job.entry.uid, outcome.describe(err))
            for task in tasks:
                await task.nak()
        finally:
            timer.cancel()
            for beat in beating:
                beat.cancel()

    # ------------------------------------------------------------------ deciding

    async def _one(self, job: JobBinding, tasks: list[TaskMsg]) -> list[Decision]:
        (task,) = tasks
        decoded = self._decode(task)
        if not isinstance(decoded, protocol.Task):
            return [decoded]
        uid, item_id = decoded.job.uid, decoded.item_id
        ctx = TaskContext(task=decoded, attempt=task.attempt, worker_id=self.worker_id)
        try:
            value = await call_handler(self.handler, ctx)
        except Exception as err:
            decision = outcome.after_error(err, uid, item_id, task.attempt, job.max_deliver, self.worker_id)
            _log_failure(decision, f"item {item_id} of job {uid}", task.attempt)
            return [decision]
        return [outcome.after_value(value, uid, item_id, task.attempt, job.max_deliver, self.worker_id)]

    async def _batch(self, job: JobBinding, tasks: list[TaskMsg]) -> list[Decision]:
        """Tasks that are not usable are decided alone; the others go to one handler call."""
        unusable: dict[int, Decision] = {}
        contexts: list[TaskContext] = []
        for index, task in enumerate(tasks):
            decoded = self._decode(task)
            if isinstance(decoded, protocol.Task):
                contexts.append(TaskContext(task=decoded, attempt=task.attempt, worker_id=self.worker_id))
            else:
                unusable[index] = decoded
        decided = iter(await self._call_batch(job, contexts) if contexts else [])
        return [unusable[i] if i in unusable else next(decided) for i in range(len(tasks))]

    async def _call_batch(self, job: JobBinding, contexts: list[TaskContext]) -> list[Decision]:
        max_deliver, worker = job.max_deliver, self.worker_id
        try:
            outcomes = batch_outcomes(await call_handler(self.handler, contexts), len(contexts))
        except Exception as err:
            decisions = [
                outcome.after_error(err, c.job.uid, c.item_id, c.attempt, max_deliver, worker)
                for c in contexts
            ]
            first = contexts[0]
            what = f"item {first.item_id} of job {first.job.uid}"
            if len(contexts) > 1:
                what = f"a batch of {len(contexts)} tasks of job {first.job.uid}"
            _log_failure(decisions[0], what, first.attempt)
            return decisions
        decisions = []
        for ctx, value in zip(contexts, outcomes, strict=True):
            decision = outcome.after_value(value, ctx.job.uid, ctx.item_id, ctx.attempt, max_deliver, worker)
            if isinstance(value, BaseException):
                _log_failure(decision, f"item {ctx.item_id} of job {ctx.job.uid}", ctx.attempt)
            decisions.append(decision)
        return decisions

    def _decode(self, task: TaskMsg) -> protocol.Task | Decision:
        """The task, or what to do with a message that is not a usable task."""
        msg, attempt = task.msg, task.attempt
        try:
            return protocol.decode_task(msg.data)
        except protocol.UnsupportedVersion as err:
            ids = outcome.recover_ids(str(msg.subject), msg.headers, msg.data)
            if ids is None:
                log.warning("TERM a task on %s (no job uid / item id to report): %s", msg.subject, err)
                return Refuse()
            uid, item_id = ids
            log.warning("refusing item %s of job %s: %s", item_id, uid, err)
            failed = outcome.failed_result(uid, item_id, f"task refused: {err}", attempt, self.worker_id)
            return Publish(failed, term=True)
        except protocol.MalformedMessage as err:
            ids = outcome.recover_ids(str(msg.subject), msg.headers)
            if ids is None:
                log.warning(
                    "TERM a malformed task on %s (no job uid / item id to report): %s", msg.subject, err
                )
                return Refuse()
            uid, item_id = ids
            log.warning("item %s of job %s is malformed, failing it: %s", item_id, uid, err)
            failed = outcome.failed_result(uid, item_id, f"malformed task: {err}", attempt, self.worker_id)
            return Publish(failed)

    # ------------------------------------------------------------------ settling

    async def _carry_out(self, job: JobBinding, tasks: list[TaskMsg], decisions: list[Decision]) -> None:
        """NAK and TERM what has no result now; hand the results to the publisher and wait for them."""
        published: list[tuple[TaskMsg, Publish]] = []
        for task, decision in zip(tasks, decisions, strict=True):
            if isinstance(decision, Retry):
                await task.nak(decision.delay)
            elif isinstance(decision, Refuse):
                await task.term()
            else:
                published.append((task, decision))
        await self.results.settle(job.entry.pipeline, published)


def batch_outcomes(returned: Any, expected: int) -> list[Any]:
    """A batch handler's return value as a list of `expected` outcomes; BatchShapeError otherwise."""
    if isinstance(returned, str | bytes | bytearray | Mapping) or not hasattr(returned, "__iter__"):
        raise BatchShapeError(
            f"a batch handler must return a list of {expected} outcome(s), one per task in order; "
            f"it returned {type(returned).__name__}"
        )
    outcomes = list(returned)
    if len(outcomes) != expected:
        raise BatchShapeError(f"the batch handler returned {len(outcomes)} outcome(s) for {expected} task(s)")
    return outcomes


def _log_failure(decision: Decision, what: str, attempt: int) -> None:
    if isinstance(decision, Retry):
        log.warning(
            "%s failed on delivery %d, NAK for redelivery in %ds: %s",
            what,
            attempt,
            decision.delay,
            outcome.clip(decision.reason, 300),
        )
    elif isinstance(decision, Publish):
        error = outcome.clip(decision.result.error or "", 300)
        if error.startswith("exhausted "):
            log.warning("%s failed: %s", what, error)
        else:
            log.info("%s failed permanently: %s", what, error)


__all__ = [
    "CRASH_AFTER_RESULT_ENV",
    "BatchShapeError",
    "JobBinding",
    "TaskRunner",
    "batch_outcomes",
    "delivery_count",
]
