"""One task, start to finish: handler, result publish, and only then the ACK.

Rules (docs/protocol.md, "Acknowledgement rules"):
- the result is published with a JetStream ack (durable) BEFORE the task is ACKed; a crash in
  between means redelivery, and the re-published result carries the same `Nats-Msg-Id`, so the
  results stream and the collector count it once;
- a task is always settled: ACK (a result was recorded), NAK (try again), or TERM (unusable and
  not attributable to any item). Never left to time out, except when the process dies.
- a task of a protocol version this worker does not speak is refused: a failed result naming the
  reason (when its job uid and item id can be recovered), then TERM, since no redelivery to a
  worker of this version can do better.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from mljob import protocol
from mljob.worker import outcome
from mljob.worker.context import PermanentError, TaskContext
from mljob.worker.handler import Handler, call_handler

log = logging.getLogger(__name__)

#: Chaos/test hook: when set to an item id, the process exits (status 137, like SIGKILL) right
#: after that item's result is durable and before its task is ACKed. Never set in production.
CRASH_AFTER_RESULT_ENV = "MLJOB_WORKER_CRASH_AFTER_RESULT"

#: announce(subject): a core NATS publish with an empty body (heartbeats; loss is harmless).
Announcer = Callable[[str], Awaitable[object]]
#: publish(subject, body, headers): a JetStream publish that returns once the stream stored it.
Publisher = Callable[[str, bytes, dict[str, str]], Awaitable[object]]


@dataclass(frozen=True)
class JobBinding:
    """What the runner needs to know about the job a task came from."""

    entry: protocol.RegistryEntry
    ack_wait: float
    max_deliver: int


@dataclass(frozen=True)
class _Decision:
    """The result to publish for a task, and how to settle the task once it is durable."""

    uid: str
    item_id: str
    result: protocol.Result
    term: bool = False  # TERM instead of ACK: the task is refused, not processed


class TaskRunner:
    def __init__(
        self,
        handler: Handler,
        publish: Publisher,
        worker_id: str,
        *,
        publish_attempts: int = 5,
        publish_backoff: float = 0.2,
        ack_timeout: float = 5.0,
        announce: Announcer | None = None,
    ) -> None:
        self.handler = handler
        self.publish = publish
        self.worker_id = worker_id
        self.publish_attempts = publish_attempts
        self.publish_backoff = publish_backoff
        self.ack_timeout = ack_timeout
        self.crash_after_result = os.environ.get(CRASH_AFTER_RESULT_ENV) or None
        self.announce = announce

    async def process(self, job: JobBinding, msg: Msg) -> None:
        """Run one task; on cancellation (worker stopping) NAK it unless it was already settled."""
        settled = False
        heartbeat = asyncio.create_task(_heartbeat(msg, max(job.ack_wait / 3, 0.5), job.entry, self.announce))
        try:
            settled = await self._process(job, msg)
        except asyncio.CancelledError:
            if not settled:
                await _settle(msg.nak(), "NAK")
            raise
        except Exception as err:  # a bug here must not strand the task or kill the loop
            log.error(
                "unexpected error processing a task of job %s: %s", job.entry.uid, outcome.describe(err)
            )
            await _settle(msg.nak(), "NAK")
        finally:
            heartbeat.cancel()

    async def _process(self, job: JobBinding, msg: Msg) -> bool:
        attempt = delivery_count(msg)
        decided = await self._decide(job, msg, attempt)
        if decided is None:
            return True  # already NAKed or TERMed
        uid, item_id, result = decided.uid, decided.item_id, decided.result
        body, problem = outcome.encode_bounded(result)
        if problem:
            log.warning("item %s of job %s: %s; sending a failed result", item_id, uid, problem)
        subject = protocol.results_subject(job.entry.pipeline, uid)
        headers = {protocol.MSG_ID_HEADER: protocol.result_msg_id(uid, item_id)}
        published = await outcome.publish_with_retry(
            lambda: self.publish(subject, body, headers),
            attempts=self.publish_attempts,
            first_delay=self.publish_backoff,
            what=f"the result of item {item_id} of job {uid}",
        )
        if not published:
            log.warning(
                "NAK item %s of job %s for immediate redelivery: its result could not be sent", item_id, uid
            )
            await _settle(msg.nak(), "NAK")
            return True
        if self.crash_after_result is not None and item_id == self.crash_after_result:
            log.critical("%s=%s: exiting after the result, before the ACK", CRASH_AFTER_RESULT_ENV, item_id)
            os._exit(137)
        if decided.term:
            await _settle(msg.term(), "TERM")
            return True
        try:
            await msg.ack_sync(timeout=self.ack_timeout)
        except Exception as err:
            log.warning(
                "ACK of item %s of job %s failed (%s); it will be redelivered and its result deduplicated",
                item_id,
                uid,
                outcome.describe(err),
            )
        return True

    async def _decide(self, job: JobBinding, msg: Msg, attempt: int) -> _Decision | None:
        """What to publish and how to settle, or None when the task was settled without a result."""
        try:
            task = protocol.decode_task(msg.data)
        except protocol.UnsupportedVersion as err:
            ids = outcome.recover_ids(str(msg.subject), msg.headers, msg.data)
            if ids is None:
                log.warning("TERM a task on %s (no job uid / item id to report): %s", msg.subject, err)
                await _settle(msg.term(), "TERM")
                return None
            uid, item_id = ids
            log.warning("refusing item %s of job %s: %s", item_id, uid, err)
            error = f"task refused: {err}"
            failed = outcome.failed_result(uid, item_id, error, attempt, self.worker_id)
            return _Decision(uid, item_id, failed, term=True)
        except protocol.MalformedMessage as err:
            ids = outcome.recover_ids(str(msg.subject), msg.headers)
            if ids is None:
                log.warning(
                    "TERM a malformed task on %s (no job uid / item id to report): %s", msg.subject, err
                )
                await _settle(msg.term(), "TERM")
                return None
            uid, item_id = ids
            log.warning("item %s of job %s is malformed, failing it: %s", item_id, uid, err)
            error = f"malformed task: {err}"
            return _Decision(
                uid, item_id, outcome.failed_result(uid, item_id, error, attempt, self.worker_id)
            )
        uid, item_id = task.job.uid, task.item_id
        ctx = TaskContext(task=task, attempt=attempt, worker_id=self.worker_id)
        try:
            value = await call_handler(self.handler, ctx)
        except PermanentError as err:
            error = str(err) or "PermanentError"
            log.info("item %s of job %s failed permanently: %s", item_id, uid, outcome.clip(error, 300))
            return _Decision(
                uid, item_id, outcome.failed_result(uid, item_id, error, attempt, self.worker_id)
            )
        except Exception as err:
            reason = outcome.describe(err)
            if outcome.is_last_delivery(attempt, job.max_deliver):
                error = outcome.exhausted_error(attempt, reason)
                log.warning("item %s of job %s failed: %s", item_id, uid, outcome.clip(error, 300))
                return _Decision(
                    uid, item_id, outcome.failed_result(uid, item_id, error, attempt, self.worker_id)
                )
            delay = outcome.nak_delay(attempt)
            log.warning(
                "item %s of job %s failed on delivery %d, NAK for redelivery in %ds: %s",
                item_id,
                uid,
                attempt,
                delay,
                outcome.clip(reason, 300),
            )
            await _settle(msg.nak(delay=delay), "NAK")
            return None
        return _Decision(uid, item_id, outcome.succeeded_result(uid, item_id, value, attempt, self.worker_id))


def delivery_count(msg: Msg) -> int:
    try:
        return max(1, int(msg.metadata.num_delivered))
    except Exception:
        return 1


async def _heartbeat(
    msg: Msg, interval: float, entry: protocol.RegistryEntry, announce: Announcer | None
) -> None:
    """Tell NATS the task is still being worked on, so ack_wait does not expire under a live
    handler, and tell the operator the job is alive, so a long task is not taken for a stall."""
    while True:
        await asyncio.sleep(interval)
        try:
            await msg.in_progress()
            if announce is not None:
                await announce(protocol.heartbeat_subject(entry.pipeline, entry.uid))
        except Exception as err:
            log.debug("in-progress heartbeat failed: %s", err)


async def _settle(call: Awaitable[object], what: str) -> None:
    try:
        await call
    except Exception as err:
        log.warning("%s failed: %s", what, outcome.describe(err))


__all__ = ["CRASH_AFTER_RESULT_ENV", "JobBinding", "Publisher", "TaskRunner", "delivery_count"]
