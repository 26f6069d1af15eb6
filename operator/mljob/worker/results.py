"""Results published in groups, then their tasks settled in groups (docs/protocol.md, acknowledgements).

Tasks hand their results to one `ResultPublisher` per worker. It publishes whatever has finished
since its last publish as one group (`publish_confirmed`: one bounded wait for all the group's
PubAcks), so a fast task never waits for a slow one and a busy worker pays one round trip for
many results. Then, for each result the stream stored, the task gets a plain ACK (or TERM), and
the group one `flush` (a bounded PING/PONG: the acks reached the server).

Why plain, unconfirmed acks are safe: the result is durable before its task is acked; an ack
that gets lost only means a redelivery, whose result carries the same `Nats-Msg-Id` (the results
stream drops it) and the same primary key in the ledger (the collector counts each item once).

A result the stream did not confirm is retried (waiting `backoff` seconds, then doubling, at
most 2 s) for at least `attempts` tries and at least `patience` seconds from its first failure;
only then is its task NAKed without delay, so it comes back at once. The patience is what makes
a NATS outage cost nothing: a JetStream leader election takes seconds (4-9 s measured on the
clustered stack), and a NAK per outage would use up a task's deliveries (`maxDeliver`) and fail
an item whose result was ready. Meanwhile the task's heartbeat (runner.py) keeps it in progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from mljob import protocol
from mljob.transport.jspublish import DEFAULT_WINDOW, Outgoing
from mljob.worker.outcome import (
    MAX_PUBLISH_RETRY_DELAY,
    Publish,
    describe,
    encode_bounded,
    publish_retry_delay,
)
from mljob.worker.taskmsg import TaskMsg

log = logging.getLogger(__name__)

#: Chaos/test hook: when set to an item id, the process exits (status 137, like SIGKILL) right
#: after that item's result is durable and before its task is ACKed. Never set in production.
CRASH_AFTER_RESULT_ENV = "MLJOB_WORKER_CRASH_AFTER_RESULT"

#: publish_many(messages) -> the failures by index ({} when the stream stored every message).
PublishMany = Callable[[Sequence[Outgoing]], Awaitable[dict[int, BaseException]]]
#: flush(): returns once what was sent so far reached the server (bounded); raises otherwise.
Flush = Callable[[], Awaitable[object]]


@dataclass(eq=False)
class _Settlement:
    """The results one `settle` call waits for: one future for all of them, resolved by the
    last; `deadline` (event-loop time) is the safety net's (see ResultPublisher._expire)."""

    left: int
    deadline: float
    done: asyncio.Future[None]
    pending: list[_Pending] = field(default_factory=list)


@dataclass(eq=False)
class _Pending:
    task: TaskMsg
    uid: str
    item_id: str
    outgoing: Outgoing
    term: bool
    settlement: _Settlement
    tries: int = 0
    #: Event-loop time of the first failed try (None while none failed).
    first_failure: float | None = None
    resolved: bool = False

    def resolve(self) -> None:
        if self.resolved:
            return
        self.resolved = True
        settlement = self.settlement
        settlement.left -= 1
        if settlement.left <= 0 and not settlement.done.done():
            settlement.done.set_result(None)


@dataclass
class ResultPublisher:
    publish_many: PublishMany
    flush: Flush
    attempts: int = 5
    backoff: float = 0.2
    #: Seconds from a result's first failed try during which it is retried (see the module doc).
    patience: float = 60.0
    #: The longest a task waits for its result to be settled (a safety net; see `settle_bound`).
    wait_bound: float = 300.0
    crash_after_result: str | None = field(
        default_factory=lambda: os.environ.get(CRASH_AFTER_RESULT_ENV) or None
    )
    max_group: int = DEFAULT_WINDOW
    _queue: list[_Pending] = field(default_factory=list, init=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _open: set[_Settlement] = field(default_factory=set, init=False)

    async def settle(self, pipeline: str, decided: Sequence[tuple[TaskMsg, Publish]]) -> None:
        """Publish these results (in the next group) and return once each task is settled: ACKed
        or TERMed after its result was stored, or NAKed when it could not be stored.

        One future per call, no timer: a timer and an `asyncio.wait` per task were a tenth of
        a busy worker's CPU. The bound (`wait_bound`) is kept by `run`'s one sweep instead."""
        if not decided:
            return
        loop = asyncio.get_running_loop()
        settlement = _Settlement(len(decided), loop.time() + self.wait_bound, loop.create_future())
        settlement.pending = [self._pending(pipeline, task, publish, settlement) for task, publish in decided]
        self._open.add(settlement)
        self._queue.extend(settlement.pending)
        self._ready.set()
        try:
            await settlement.done
        finally:
            self._open.discard(settlement)

    async def _expire(self) -> None:
        """The safety net, for a bug only: NAK every task whose result is not settled within
        `wait_bound` (never leave a task unsettled), checked a few times per bound."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.05, self.wait_bound / 4))
            now = loop.time()
            for settlement in [s for s in self._open if s.deadline <= now]:
                stuck = [p for p in settlement.pending if not p.resolved]
                log.error(
                    "%d result(s) not settled within %.0fs; NAK their tasks for redelivery",
                    len(stuck),
                    self.wait_bound,
                )
                for p in stuck:
                    await p.task.nak()
                    p.resolve()

    def _pending(self, pipeline: str, task: TaskMsg, publish: Publish, settlement: _Settlement) -> _Pending:
        result = publish.result
        body, problem = encode_bounded(result)
        if problem:
            log.warning(
                "item %s of job %s: %s; sending a failed result", result.item_id, result.job_uid, problem
            )
        subject = protocol.results_subject(pipeline, result.job_uid)
        outgoing = Outgoing(subject, body, protocol.result_msg_id(result.job_uid, result.item_id))
        return _Pending(task, result.job_uid, result.item_id, outgoing, publish.term, settlement)

    async def run(self) -> None:
        """Publish groups until cancelled (after the worker's last task is settled)."""
        expiring = asyncio.create_task(self._expire(), name="mljob-result-settle-bound")
        try:
            await self._publish_groups()
        finally:
            expiring.cancel()

    async def _publish_groups(self) -> None:
        while True:
            await self._ready.wait()
            await asyncio.sleep(0)  # results finishing in this turn of the loop join the group
            group, self._queue = self._queue[: self.max_group], self._queue[self.max_group :]
            if not self._queue:
                self._ready.clear()
            try:
                await self._publish_group(group)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug here must neither strand the tasks nor stop publishing
                log.error("publishing a group of %d result(s) failed: %s", len(group), describe(err))
                for p in group:
                    await p.task.nak()
                    p.resolve()

    async def _publish_group(self, group: list[_Pending]) -> None:
        live = []
        for p in group:
            if p.task.settled:  # NAKed meanwhile (the worker is stopping): no result needed
                p.resolve()
            else:
                live.append(p)
        if not live:
            return
        try:
            failures = await self.publish_many([p.outgoing for p in live])
        except asyncio.CancelledError:
            raise
        except Exception as err:
            failures = dict.fromkeys(range(len(live)), err)
        stored = [p for i, p in enumerate(live) if i not in failures]
        if stored:
            await self._settle_stored(stored)
        if failures:
            await self._retry_or_give_up([(live[i], err) for i, err in sorted(failures.items())])

    async def _settle_stored(self, stored: list[_Pending]) -> None:
        if self.crash_after_result is not None and any(p.item_id == self.crash_after_result for p in stored):
            log.critical(
                "%s=%s: exiting after the result, before the ACK",
                CRASH_AFTER_RESULT_ENV,
                self.crash_after_result,
            )
            os._exit(137)
        retried = [p for p in stored if p.first_failure is not None]
        if retried:
            now = asyncio.get_running_loop().time()
            log.info(
                "%d result(s) stored after failed tries (at most %d tries, %.1fs)",
                len(retried),
                max(p.tries for p in retried) + 1,
                max(now - (p.first_failure or now) for p in retried),
            )
        sent = 0
        for p in stored:
            sent += await (p.task.term() if p.term else p.task.ack())
        if sent:
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning(
                    "flushing %d ACK(s) failed (%s); a lost ACK means a redelivery whose result is "
                    "deduplicated",
                    sent,
                    describe(err),
                )
        for p in stored:
            p.resolve()

    async def _retry_or_give_up(self, failed: list[tuple[_Pending, BaseException]]) -> None:
        loop = asyncio.get_running_loop()
        again: dict[int, list[_Pending]] = {}
        now = loop.time()
        for p, err in failed:
            p.tries += 1
            if p.first_failure is None:
                p.first_failure = now
            if p.tries >= self.attempts and now - p.first_failure >= self.patience:
                log.warning(
                    "publishing the result of item %s of job %s failed %d times in %.0fs, giving up: "
                    "%s; NAK it for immediate redelivery",
                    p.item_id,
                    p.uid,
                    p.tries,
                    now - p.first_failure,
                    describe(err),
                )
                await p.task.nak()
                p.resolve()
            else:
                again.setdefault(p.tries, []).append(p)
        for tries, retried in again.items():
            delay = publish_retry_delay(self.backoff, tries)
            # One warning when a result's publish starts failing, DEBUG while it goes on (a
            # retry every 2 s of every result in flight would flood the log during an outage).
            level = logging.WARNING if tries == 1 else logging.DEBUG
            log.log(
                level,
                "publishing %d result(s) failed (try %d), retrying in %.1fs for at least %d tries "
                "and %.0fs before NAKing: %s",
                len(retried),
                tries,
                delay,
                self.attempts,
                self.patience,
                describe(next(err for p, err in failed if p is retried[0])),
            )
            loop.call_later(delay, self._requeue, retried)

    def _requeue(self, retried: list[_Pending]) -> None:
        self._queue.extend(retried)
        self._ready.set()


def settle_bound(
    attempts: int, backoff: float, publish_timeout: float, flush_timeout: float, patience: float = 0.0
) -> float:
    """How long a result can take to be settled when nothing is broken but the servers: per try,
    the group ahead of it and its own group each wait at most twice the publish timeout (a free
    window slot, then the PubAcks) plus the flush; the tries are `attempts` of them with their
    backoffs, or as many as fit in `patience` and one more; plus a margin."""
    per_try = 2 * (2 * publish_timeout + flush_timeout)
    backoffs = sum(publish_retry_delay(backoff, tries) for tries in range(1, attempts + 1))
    return max(attempts * per_try + backoffs, patience + per_try + MAX_PUBLISH_RETRY_DELAY) + 10.0


__all__ = ["CRASH_AFTER_RESULT_ENV", "Flush", "PublishMany", "ResultPublisher", "settle_bound"]
