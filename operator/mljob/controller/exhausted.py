"""Items NATS gave up on: max-deliveries advisories -> failed items, within seconds (rows 2, 3).

Why: after ``max_deliver`` JetStream stops redelivering a task, while Redis still lists its item
as pending, so without this the job would wait for it forever. JetStream announces the moment
with a ``MAX_DELIVERIES`` advisory carrying the message's stream sequence, and the message stays
readable in the pipeline's work-queue stream. The operator keeps those advisories in a stream of its
own (``protocol.ADVISORY_STREAM``), so one published while it is down is handled when it is back.
No decision here depends on consumer counters such as ``num_ack_pending`` (row 3): they differ
between server versions.

Per advisory: read the task by sequence -> fail its item through ``ledger.record`` (the
ledger's primary key arbitrates against a real result landing at the same moment: the first
outcome stands, never both) -> delete the task message -> ack the advisory -> wake the job.

* Advisories of streams that are not task streams, or of other consumers: acked and ignored.
* The pipeline's stream is gone, or the message is gone (the worker's ack made it after all,
  the job was cleaned up, or this advisory was already handled), or the sequence holds another
  job's task (the stream was recreated since): acked, nothing to do.
* Malformed advisories, and tasks that name no item: one log line, acked.
* The ledger refuses the item's failure (it is not a registered item of the job, or Postgres
  refuses the row): the task is kept, the advisory NAKed for a retry in
  ``REFUSED_RETRY_SECONDS``, the rest of the batch handled. Deleting the task would drop an item
  whose outcome nobody recorded.
* NATS, Postgres or Redis unavailable: nothing acked, the advisory comes back; the loop backs off
  (0.5 s doubling to 5 s) and resumes by itself. Every step is idempotent, so a replay is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from mljob import ledger, protocol
from mljob.adapters import jetstream
from mljob.adapters.outage import Outage, ack, consume
from mljob.adapters.redis_state import JobState, RecordStatus
from mljob.adapters.results_store import RejectedResult, ResultsStore
from mljob.ops import logs, metrics

__all__ = ["REASON", "Advisory", "ExhaustedDeliveries", "parse_advisory"]

log = logging.getLogger(__name__)

REASON = "MaxDeliveriesExceeded"
#: Delay before an advisory whose failure the ledger refused is handled again.
REFUSED_RETRY_SECONDS = 60.0


class MalformedAdvisory(ValueError):
    """An advisory without the fields we need; it can never become valid."""


class RefusedRecord(Exception):
    """The ledger refused to record the exhausted item's failure: its task must stay."""


@dataclass(frozen=True)
class Advisory:
    """The fields of a max-deliveries advisory this module uses."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int
    timestamp: datetime | None

    @property
    def job(self) -> tuple[str, str] | None:
        """(pipeline, uid) when this is a job's consumer on a pipeline's task stream, else None."""
        return jetstream.job_of_consumer(self.stream, self.consumer)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_advisory(data: bytes) -> Advisory:
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise TypeError("not a JSON object")
        stream, consumer = body["stream"], body["consumer"]
        seq, deliveries = body["stream_seq"], body.get("deliveries", 0)
        if not isinstance(stream, str) or not isinstance(consumer, str):
            raise TypeError("stream and consumer must be strings")
        if not isinstance(seq, int) or seq < 1 or not isinstance(deliveries, int):
            raise TypeError("stream_seq and deliveries must be integers, stream_seq >= 1")
    except (ValueError, KeyError, TypeError) as err:
        raise MalformedAdvisory(f"{type(err).__name__}: {err}") from err
    stamp: datetime | None = None
    with contextlib.suppress(TypeError, ValueError):
        stamp = datetime.fromisoformat(str(body.get("timestamp", "")))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)  # JetStream writes UTC; a bare one is read as UTC
    return Advisory(stream, consumer, seq, deliveries, stamp)


def item_of(uid: str, data: bytes | None, headers: dict[str, Any] | None) -> str | None:
    """The item id of a task message: from its body, else from its ``Nats-Msg-Id`` header."""
    try:
        task = protocol.decode_task(data or b"")
        if task.job.uid == uid:
            return task.item_id
    except protocol.MalformedMessage:
        pass
    msg_id = str((headers or {}).get(protocol.MSG_ID_HEADER, ""))
    prefix = protocol.task_msg_id(uid, "")
    if msg_id.startswith(prefix) and len(msg_id) > len(prefix):
        return msg_id[len(prefix) :]
    return None


def _delivery(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # not a JetStream message (tests), or no metadata: count it as the first
        return 1


def job_of(uid: str, data: bytes | None) -> tuple[str, str, str]:
    """(namespace, name, uid) of a task's job for log lines; the task names it (else blanks)."""
    try:
        job = protocol.decode_task(data or b"").job
    except protocol.MalformedMessage:
        return "", "", uid
    return (job.namespace, job.name, uid) if job.uid == uid else ("", "", uid)


class ExhaustedDeliveries:
    """Consumes max-deliveries advisories and fails their items; see the module docstring."""

    def __init__(
        self,
        js: JetStreamContext,
        nc: NATS,
        store: ResultsStore,
        state: JobState,
        on_failed: Callable[[str], None] | None = None,
        *,
        batch: int = 64,
        fetch_timeout: float = 1.0,
        consumer: str = protocol.ADVISORY_CONSUMER,
        ensure: Callable[[], Awaitable[None]] | None = None,
        refused_retry_seconds: float = REFUSED_RETRY_SECONDS,
    ) -> None:
        self.js = js
        self.nc = nc
        self.store = store
        self.state = state
        self.on_failed = on_failed
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.consumer = consumer
        #: recreates the stream and consumer after an outage (None: they are someone else's)
        self.ensure = ensure
        self.refused_retry_seconds = refused_retry_seconds
        self._outage = Outage(log, "max-deliveries advisories")

    async def run(self, stop: asyncio.Event) -> None:
        """Handle advisories until ``stop`` is set; never stops on bad input or outages."""
        await consume(
            self.nc, protocol.ADVISORY_STREAM, self.consumer, self.process, self._outage, stop,
            batch=self.batch, fetch_timeout=self.fetch_timeout, ensure=self.ensure,
        )  # fmt: skip

    async def process(self, msgs: list[Msg]) -> bool:
        """Handle a batch in order. False when a dependency failed: that advisory and the rest of
        the batch are NAKed for a later retry, none of them acked."""
        for index, msg in enumerate(msgs):
            try:
                await self.handle(msg.data)
            except RefusedRecord as err:
                await self._retry_later(msg, err)
                continue
            except Exception as err:
                self._outage.report("handling a max-deliveries advisory failed; it will be retried", err)
                await self._outage.nak(msgs[index:])
                return False
            await ack(msg, log)
        return True

    async def _retry_later(self, msg: Msg, err: RefusedRecord) -> None:
        """Keep a refused advisory (and its task) for another try; warn on its first delivery."""
        delay = self.refused_retry_seconds
        first = _delivery(msg) <= 1
        (log.warning if first else log.debug)("%s; task kept, advisory retried every %gs", err, delay)
        try:
            await msg.nak(delay=delay)
        except Exception as nak_err:
            log.debug("nak failed (redelivery after ack_wait instead): %s", nak_err)

    async def handle(self, data: bytes) -> str | None:
        """Settle one advisory; returns the failed item id, or None when there was nothing to fail.

        Raises when a dependency failed or the ledger refused the failure (RefusedRecord): the
        advisory must then be retried, and its task is still there.
        """
        try:
            advisory = parse_advisory(data)
        except MalformedAdvisory as err:
            log.warning("ignoring a malformed max-deliveries advisory: %s", err)
            return None
        job = advisory.job
        if job is None:
            log.debug("ignoring max-deliveries advisory of %s/%s", advisory.stream, advisory.consumer)
            return None
        pipeline, uid = job
        try:
            msg = await jetstream.get_task_message(self.js, pipeline, uid, advisory.stream_seq)
        except jetstream.JobStreamMissing:
            log.debug("job %s: stream gone, advisory for seq %d needs nothing", uid, advisory.stream_seq)
            return None
        if msg is None:
            log.debug("job %s: task seq %d already settled", uid, advisory.stream_seq)
            return None
        if advisory.timestamp is not None and msg.time is not None and advisory.timestamp < _aware(msg.time):
            # The task was published after the advisory: the stream was recreated since and its
            # sequences started again, so this (old) advisory names another, healthy task.
            log.info(
                "job %s: stale advisory for seq %d (the stream was recreated); ignored",
                uid,
                advisory.stream_seq,
            )
            return None
        item_id = item_of(uid, msg.data, msg.headers)
        if item_id is None:
            log.warning("job %s: exhausted task seq %d names no item; left alone", uid, advisory.stream_seq)
            return None
        with logs.job_context(*job_of(uid, msg.data)):
            await self._fail(uid, item_id, advisory)
        await jetstream.delete_task_message(self.js, pipeline, advisory.stream_seq)
        if self.on_failed is not None:
            try:
                self.on_failed(uid)
            except Exception:
                log.exception("on_failed callback failed for job %s", uid)
        return item_id

    async def _fail(self, uid: str, item_id: str, advisory: Advisory) -> None:
        n = advisory.deliveries
        message = f"item {item_id} was delivered {n} times without an answer (the worker crashed or hung)"
        refused = f"job {uid}: the ledger refused item {item_id}'s {REASON} failure"
        try:
            outcomes = await ledger.record(
                self.store, self.state, [ledger.failure(uid, item_id, REASON, message, n)]
            )
        except RejectedResult as err:
            raise RefusedRecord(f"{refused} ({err})") from err
        if not outcomes:  # `record` leaves out what the ledger refused (and logged why)
            raise RefusedRecord(f"{refused} (not a registered item of the job)")
        newly = sum(1 for o in outcomes if o.status is RecordStatus.NEW)
        metrics.items_failed_by_operator(REASON, newly)
        latency = ""
        if advisory.timestamp is not None:
            seconds = (protocol.utcnow() - advisory.timestamp).total_seconds()
            latency = f", {seconds:.3f}s after exhaustion"
        if newly:
            log.info("job %s: item %s failed (%s, %d deliveries%s)", uid, item_id, REASON, n, latency)
        else:
            log.info("job %s: item %s exhausted %d deliveries but already had an outcome", uid, item_id, n)
