"""A fetched task and whether it is settled; its heartbeats while it is being worked on.

Every ACK, NAK and TERM of the worker goes through `TaskMsg`, so a task is settled exactly once
even when two paths race for it (the result publisher about to ACK, a stopping worker NAKing
what is unfinished): the first one wins, the other becomes a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

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


class HeartbeatLog:
    """Heartbeat failures: one warning when they start, DEBUG while they go on (one per task and
    interval would flood the log during a NATS outage), and a new warning after a success."""

    def __init__(self) -> None:
        self.failing = False

    def failed(self, err: BaseException) -> None:
        if self.failing:
            log.debug("in-progress heartbeat failed: %s", describe(err))
            return
        self.failing = True
        log.warning(
            "in-progress heartbeat failed: %s (tasks may be redelivered after ack_wait while their "
            "handler still runs; further failures are logged at DEBUG until one succeeds)",
            describe(err),
        )

    def succeeded(self) -> None:
        self.failing = False


def heartbeat_interval(ack_wait: float) -> float:
    return max(ack_wait / 3, 0.5)


async def heartbeat(
    tasks: Sequence[TaskMsg],
    interval: float,
    entry: protocol.RegistryEntry,
    announce: Announcer | None,
    failures: HeartbeatLog,
) -> None:
    """Tell NATS the tasks are still being worked on, so ack_wait does not expire under a live
    handler, and tell the operator the job is alive, so a long task is not taken for a stall.
    One loop for a whole batch: a +WPI per unsettled task, one heartbeat message per interval."""
    while True:
        await asyncio.sleep(interval)
        try:
            for task in tasks:
                if not task.settled:
                    await task.msg.in_progress()
            if announce is not None:
                await announce(protocol.heartbeat_subject(entry.pipeline, entry.uid))
        except Exception as err:
            failures.failed(err)
        else:
            failures.succeeded()


__all__ = ["Announcer", "HeartbeatLog", "TaskMsg", "delivery_count", "heartbeat", "heartbeat_interval"]
