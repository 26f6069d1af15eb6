"""A fetched task and whether it is settled; its heartbeats while it is being worked on.

Every ACK, NAK and TERM of the worker goes through `TaskMsg`, so a task is settled exactly once
even when two paths race for it (the result publisher about to ACK, a stopping worker NAKing
what is unfinished): the first one wins, the other becomes a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from functools import partial

from nats.aio.msg import Msg

from mljob import protocol
from mljob.worker.outcome import describe

log = logging.getLogger(__name__)

#: announce(subject): a core NATS publish with an empty body (heartbeats; loss is harmless).
Announcer = Callable[[str], Awaitable[object]]


def delivery_count(msg: Msg) -> int:
    try:
        return max(1, int(msg.metadata.num_delivered))
    except Exception:
        return 1


class TaskMsg:
    """One delivered task message, settled at most once (plain, unconfirmed acks: see results.py)."""

    __slots__ = ("attempt", "msg", "settled")

    def __init__(self, msg: Msg) -> None:
        self.msg = msg
        self.settled = False
        #: How many times this task has been delivered, this delivery included.
        self.attempt = delivery_count(msg)

    async def ack(self) -> bool:
        return await self._settle("ACK", self.msg.ack)

    async def term(self) -> bool:
        return await self._settle("TERM", self.msg.term)

    async def nak(self, delay: float | None = None) -> bool:
        return await self._settle("NAK", lambda: self.msg.nak(delay=delay) if delay else self.msg.nak())

    async def _settle(self, what: str, call: Callable[[], Awaitable[object]]) -> bool:
        """Send `what` unless the task is settled already; True when it was sent."""
        if self.settled:
            return False
        self.settled = True
        try:
            await call()
        except Exception as err:
            log.warning("%s failed: %s", what, describe(err))
            return False
        return True


def task_name(msg: Msg, uid: str) -> str:
    """`item <id> of job <uid>` for a log line (the id from the task's body, if it has one)."""
    try:
        return f"item {protocol.decode_task(msg.data).item_id} of job {uid}"
    except protocol.MalformedMessage:
        return f"a task of job {uid}"


class HeartbeatLog:
    """Heartbeat failures: a WARNING naming the task and the reason when its heartbeats start
    failing (its handler still runs, and it may be redelivered after ack_wait and run twice);
    DEBUG while the same task's go on failing (one per task and interval would flood the log
    during a NATS outage); a success or the end of the task re-arms the warning."""

    def __init__(self) -> None:
        #: What is failing now: a TaskMsg, or a job uid for its heartbeats to the operator.
        self.failing: set[Hashable] = set()

    def failed(self, key: Hashable, name: Callable[[], str], err: BaseException) -> None:
        """`key` failed; `name()` says what it is (only called for a line that is logged)."""
        if key in self.failing:
            log.debug("heartbeat of %s failed: %s", name(), describe(err))
            return
        self.failing.add(key)
        log.warning(
            "heartbeat of %s failed: %s (it may be redelivered after ack_wait while its handler "
            "still runs; logged at DEBUG while it keeps failing)",
            name(),
            describe(err),
        )

    def succeeded(self, key: Hashable) -> None:
        self.failing.discard(key)


def heartbeat_interval(ack_wait: float) -> float:
    return max(ack_wait / 3, 0.5)


async def heartbeat(
    tasks: Sequence[TaskMsg],
    interval: float,
    entry: protocol.RegistryEntry,
    announce: Announcer | None,
    failures: HeartbeatLog,
    first: float | None = None,
) -> None:
    """Tell NATS the tasks are still being worked on, so ack_wait does not expire under a live
    handler, and tell the operator the job is alive, so a long task is not taken for a stall.
    One loop for a whole batch: a +WPI per unsettled task, one heartbeat message per interval
    (the first after `first` seconds, default `interval`); each failure is reported for the task
    (or job) it concerns, see HeartbeatLog."""
    uid = entry.uid
    subject = protocol.heartbeat_subject(entry.pipeline, uid)
    delay = interval if first is None else first
    try:
        while True:
            await asyncio.sleep(delay)
            delay = interval
            for task in tasks:
                if not task.settled:
                    await _beat(failures, task, partial(task_name, task.msg, uid), task.msg.in_progress)
            if announce is not None:
                await _beat(failures, uid, lambda: f"job {uid} (to the operator)", lambda: announce(subject))
    finally:
        for key in (*tasks, uid):
            failures.succeeded(key)


async def _beat(
    failures: HeartbeatLog, key: Hashable, name: Callable[[], str], call: Callable[[], Awaitable[object]]
) -> None:
    try:
        await call()
    except Exception as err:
        failures.failed(key, name, err)
    else:
        failures.succeeded(key)


__all__ = [
    "Announcer",
    "HeartbeatLog",
    "TaskMsg",
    "delivery_count",
    "heartbeat",
    "heartbeat_interval",
    "task_name",
]
