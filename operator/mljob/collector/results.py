"""The result collector: shared results stream -> Postgres ledger -> Redis item state -> ACK.

Why this order (failure-modes row 1): a message is acknowledged only after its result is durable
in Postgres and its item is settled in Redis. A crash or outage anywhere before the ACK means the
message comes back, and both writes are idempotent (primary key; SREM from the pending set), so a
replay is never counted twice. Several replicas can share the durable consumer.

* Results are checked before they count. Refused, i.e. dead-lettered with the reason and acked
  at once (so a later failure of the batch does not store them twice): a body over
  ``MAX_RESULT_BYTES``, a ``version`` other than ``PROTOCOL_VERSION``, a malformed body, a job
  with no registered items, an id that is not an item of its job (the last two decided by the
  ledger in the statement that stores the rest), and a result Postgres refuses (NUL bytes...),
  isolated by retrying the batch row by row. Refusals are logged as one summary line at most
  every few seconds, so a flood of bad messages cannot flood the log.
* A result Postgres refuses for a registered item of a known job would be refused on every
  redelivery too (scenario E): the item is recorded failed instead, with the error
  ``ResultRejected: <reason>`` and no payload, through the same upsert as any result (so the
  first stored outcome still stands); the original message is dead-lettered for inspection and
  acked with its batch, after the failure is durable. The job ends with a clear per-item reason
  instead of waiting for its stall timeout. An outage is never taken for a refusal: only
  ``RejectedResult`` (Postgres refused the data) leads here.
* Postgres or Redis unavailable: nothing of the batch is acked, the batch is NAKed with a delay,
  the loop backs off (0.5 s doubling to 5 s) and resumes by itself when the service returns.
* A result for an item of a job without Redis state (after cleanup: row 10) is stored and acked,
  and creates no Redis keys. The first stored outcome of an item stands (the ledger's primary
  key), and Redis is told that outcome, never a later message's.
* When a job's pending set becomes empty, a core NATS message on ``drained_subject(uid)`` lets the
  operator finish the job at once instead of at its next poll.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from mljob import ledger, protocol
from mljob.adapters.outage import Outage, ack, consume, one_line
from mljob.adapters.redis_state import JobState, RecordStatus
from mljob.adapters.results_store import RejectedResult, ResultsStore, UpsertResult
from mljob.ops import metrics
from mljob.ops.logs import job_extra

__all__ = ["DEAD_LETTER_SOURCE", "REJECTED_REASON", "Collector"]

log = logging.getLogger(__name__)

DEAD_LETTER_SOURCE = "collector"
#: At most one summary line of refused messages per this many seconds while they keep coming.
REFUSAL_LOG_INTERVAL_SECONDS = 10.0
#: The error prefix of an item failed because Postgres refused its result (scenario E).
REJECTED_REASON = "ResultRejected"
#: Jobs whose pipeline is remembered (the cache is emptied when it grows past this).
PIPELINE_CACHE_SIZE = 100_000
#: Payload bytes per dead-letter INSERT.
DEAD_LETTER_STATEMENT_BYTES = 4 * 1024 * 1024


@dataclass
class _Parsed:
    msg: Msg
    result: protocol.Result
    pipeline: str  # the one its subject names


@dataclass(frozen=True)
class _Refusal:
    msg: Msg
    kind: str  # for the log summary, e.g. "not an item"
    reason: str  # stored with the dead letter


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _storable(text: str) -> str:
    """Text Postgres can store (no NUL), for a reason quoted in a failed result's error."""
    return _clip(text.replace("\x00", "\\x00"), 500)


class Collector:
    """Consumes results in batches; see the module docstring for the guarantees."""

    def __init__(
        self,
        js: JetStreamContext,
        nc: NATS,
        state: JobState,
        store: ResultsStore,
        *,
        batch: int = 256,
        loops: int = 1,
        fetch_timeout: float = 1.0,
        on_drained: Callable[[str], Awaitable[None]] | None = None,
        stream: str = protocol.RESULTS_STREAM,
        consumer: str = protocol.RESULTS_CONSUMER,
        subject_prefix: str = protocol.RESULTS_SUBJECT_PREFIX,
        ensure: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.js = js
        self.nc = nc
        self.state = state
        self.store = store
        self.batch = batch
        self.loops = max(1, loops)
        self.fetch_timeout = fetch_timeout
        self.on_drained = on_drained
        self.stream = stream
        self.consumer = consumer
        self.subject_prefix = subject_prefix
        #: recreates the stream and consumer after an outage (None: they are someone else's)
        self.ensure = ensure
        self._outage = Outage(log, "collector")
        self._refused: Counter[str] = Counter()  # refusals by kind, since the last summary line
        self._latest_refusal = ""
        self._refusals_logged_at = -math.inf
        self._pipelines: dict[str, str] = {}  # job uid -> pipeline (immutable per job)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and process batches until ``stop`` is set; never stops on bad input or outages."""

        def idle() -> None:
            metrics.COLLECTOR_LAG.set(0)  # nothing waits
            self._report_refusals(force=True)  # no flood to protect the log from

        try:
            # Each loop pulls through an inbox of its own; they share the consumer as replicas
            # do, every write being idempotent.
            await asyncio.gather(
                *(
                    consume(
                        self.nc,
                        self.stream,
                        self.consumer,
                        self.process,
                        self._outage,
                        stop,
                        batch=self.batch,
                        fetch_timeout=self.fetch_timeout,
                        on_idle=idle,
                        ensure=self.ensure,
                    )
                    for _ in range(self.loops)
                )
            )
        finally:
            self._report_refusals(force=True)

    async def process(self, msgs: list[Msg]) -> bool:
        """Handle one batch. True when every message was settled and acked; False when a
        dependency failed and the batch was left for redelivery (none of its results acked)."""
        if not msgs:
            return True
        metrics.COLLECTOR_BATCH.observe(len(msgs))
        settled: set[int] = set()  # id() of dead-lettered messages, already acked
        try:
            valid = await self._store(await self._parse(msgs, settled), settled)
            outcomes = await self.state.record(
                [
                    (p.result.job_uid, p.result.item_id, p.result.outcome is protocol.Outcome.FAILED)
                    for p in valid
                ],
                time.time(),
            )
        except Exception as err:
            self._outage.report("storing results failed; batch left for redelivery", err)
            await self._outage.nak([m for m in msgs if id(m) not in settled])
            await self._flush()
            return False
        metrics.count_recorded([p.result for p in valid], outcomes)
        metrics.collector_lag([p.result for p in valid])
        for p in valid:
            await self._ack(p.msg)
        await self._flush()
        drained: list[str] = []
        for o in outcomes:
            # A DUPLICATE that finds nothing pending re-announces: the first announcement may have
            # been lost (crash between record and publish, or a Redis client retry).
            if o.pending_left == 0 and o.status is not RecordStatus.NO_STATE and o.uid not in drained:
                drained.append(o.uid)
        for uid in drained:
            await self._announce(uid)
        self._report_refusals()
        return True

    async def _parse(self, msgs: list[Msg], settled: set[int]) -> list[_Parsed]:
        """Decode the batch; refuse the messages that can never be valid."""
        valid: list[_Parsed] = []
        refused: list[_Refusal] = []
        for msg in msgs:
            size = len(msg.data)
            if size > protocol.MAX_RESULT_BYTES:
                reason = (
                    f"result too large: {size} bytes, over the limit of {protocol.MAX_RESULT_BYTES} bytes"
                )
                refused.append(_Refusal(msg, "too large", reason))
                continue
            try:
                msg.data.decode("utf-8")
                result = protocol.decode_result(msg.data)
            except UnicodeDecodeError:
                refused.append(_Refusal(msg, "malformed", "invalid result: body is not UTF-8"))
                continue
            except protocol.UnsupportedVersion as err:
                refused.append(_Refusal(msg, "unsupported version", str(err)))
                continue
            except protocol.MalformedMessage as err:
                refused.append(_Refusal(msg, "malformed", str(err)))
                continue
            except Exception as err:  # a decoder bug must not wedge the loop either
                refused.append(_Refusal(msg, "malformed", f"invalid result: {one_line(err)}"))
                continue
            where = protocol.parse_results_subject(msg.subject, self.subject_prefix)
            if where is None or where[1] != result.job_uid:
                reason = (
                    f"wrong subject: a result of job {result.job_uid} belongs on "
                    f"{self.subject_prefix}.<pipeline>.{result.job_uid}, not {msg.subject}"
                )
                refused.append(_Refusal(msg, "wrong subject", reason))
                continue
            valid.append(_Parsed(msg, result, where[0]))
        valid = await self._check_pipelines(valid, refused)
        await self._refuse(refused, settled)
        return valid

    async def _check_pipelines(self, parsed: list[_Parsed], refused: list[_Refusal]) -> list[_Parsed]:
        """Refuse results sent on another pipeline's subject than their job's: a worker credential
        is scoped to its pipeline's subjects, and this makes that scope hold for results too. A
        job's pipeline never changes, so it is looked up once per job (a job without a row is
        left to the ledger, which refuses it as unknown)."""
        unknown = sorted({p.result.job_uid for p in parsed} - self._pipelines.keys())
        if unknown:
            if len(self._pipelines) > PIPELINE_CACHE_SIZE:
                self._pipelines.clear()
            self._pipelines.update(await self.store.job_pipelines(unknown))
        kept: list[_Parsed] = []
        for p in parsed:
            expected = self._pipelines.get(p.result.job_uid)
            if expected is not None and p.pipeline != expected:
                reason = (
                    f"wrong pipeline: job {p.result.job_uid} belongs to pipeline {expected!r}, "
                    f"the result came on {p.msg.subject}"
                )
                refused.append(_Refusal(p.msg, "wrong pipeline", reason))
                continue
            kept.append(p)
        return kept

    async def _store(self, parsed: list[_Parsed], settled: set[int]) -> list[_Parsed]:
        """Upsert into Postgres; return the entries to record in Redis, with the stored outcome.

        Results the ledger refuses (job never seen, not an item) are dead-lettered. If Postgres
        refuses the batch's data, retry row by row and dead-letter the refused rows.
        """
        refused: list[_Refusal] = []
        try:
            upserted = await self.store.upsert([p.result for p in parsed])
        except RejectedResult:
            kept: list[_Parsed] = []
            upserted = UpsertResult()
            for p in parsed:
                try:
                    upserted.update(await self.store.upsert([p.result]))
                except RejectedResult as err:
                    substitute = await self._fail_rejected(p, str(err))
                    if substitute is None:
                        refused.append(_Refusal(p.msg, "rejected by Postgres", str(err)))
                        continue
                    upserted.update(substitute)
                kept.append(p)
            parsed = kept
        accepted: list[_Parsed] = []
        for p in parsed:
            key = (p.result.job_uid, p.result.item_id)
            reason = upserted.refusal(key)
            if reason is not None:
                refused.append(_Refusal(p.msg, reason.split(":", 1)[0], reason))
                continue
            # Redis must agree with Postgres, where the first recorded outcome stands.
            outcome = upserted.stored.get(key)
            if outcome is not None and outcome is not p.result.outcome:
                p.result = p.result.model_copy(update={"outcome": outcome})
            accepted.append(p)
        await self._refuse(refused, settled)
        return accepted

    async def _fail_rejected(self, p: _Parsed, reason: str) -> UpsertResult | None:
        """Scenario E: Postgres refuses this result's data, and a redelivery would be refused the
        same way. Store the item as failed instead (``ResultRejected``, no payload), so the job
        ends with a clear per-item reason rather than waiting for its stall timeout. The original
        message is dead-lettered for inspection but not acked here: it is acked with the batch,
        once the failure is durable and settled in Redis. None when the failure cannot be stored
        either (a NUL in the item id: then it is not an item of any job) or the ledger refuses it
        (unknown job, not an item): the message is then refused as before."""
        failure = ledger.failure(
            p.result.job_uid, p.result.item_id, REJECTED_REASON, _storable(reason), p.result.attempts
        )
        try:
            upserted = await self.store.upsert([failure])
        except RejectedResult:
            return None
        if upserted.refusal((failure.job_uid, failure.item_id)) is not None:
            return None
        await self.store.dead_letters(
            DEAD_LETTER_SOURCE,
            [(p.msg.subject, p.msg.data, f"{reason} (the item is failed as {REJECTED_REASON})")],
        )
        p.result = failure
        self._refused["rejected by Postgres, item failed"] += 1
        metrics.RESULTS_REFUSED.labels(kind="rejected_by_postgres_item_failed").inc()
        self._latest_refusal = f"{p.msg.subject}: {_clip(reason)}"
        return upserted

    async def _refuse(self, refused: list[_Refusal], settled: set[int]) -> None:
        """Dead-letter (one statement), then ack at once: a later failure of the batch must not
        store them twice. Counted for the periodic summary line, not logged one by one."""
        if not refused:
            return
        letters: list[tuple[str, bytes, str]] = []
        size = 0
        for r in refused:  # statements of a few MB, whatever the bodies (a flood of 1 MB ones...)
            letters.append((r.msg.subject, r.msg.data, r.reason))
            size += len(r.msg.data)
            if size >= DEAD_LETTER_STATEMENT_BYTES:
                await self.store.dead_letters(DEAD_LETTER_SOURCE, letters)
                letters, size = [], 0
        await self.store.dead_letters(DEAD_LETTER_SOURCE, letters)
        for r in refused:
            await self._ack(r.msg)
            settled.add(id(r.msg))
            self._refused[r.kind] += 1
            metrics.RESULTS_REFUSED.labels(kind=metrics.label_value(r.kind)).inc()
        self._latest_refusal = f"{refused[-1].msg.subject}: {_clip(refused[-1].reason)}"

    def _report_refusals(self, *, force: bool = False) -> None:
        """One line for all refusals since the last one; at most every few seconds unless forced."""
        if not self._refused:
            return
        now = time.monotonic()
        if not force and now - self._refusals_logged_at < REFUSAL_LOG_INTERVAL_SECONDS:
            return
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self._refused.items()))
        log.warning(
            "refused %d result message(s), dead-lettered and acked (%s); latest: %s",
            sum(self._refused.values()),
            kinds,
            self._latest_refusal,
        )
        self._refused.clear()
        self._refusals_logged_at = now

    async def _ack(self, msg: Msg) -> None:
        """The one step after which a result is settled for good (a seam the crash tests use)."""
        await ack(msg, log)

    async def _flush(self) -> None:
        try:
            await self.nc.flush(timeout=5)
        except Exception as err:  # acks lost in flight only mean an idempotent redelivery
            log.warning("NATS flush failed: %s", one_line(err))

    async def _announce(self, uid: str) -> None:
        try:
            await self.nc.publish(protocol.drained_subject(uid), b"")
        except Exception as err:
            log.warning(
                "cannot publish drained event for job %s: %s", uid, one_line(err), extra=job_extra(uid)
            )
        if self.on_drained is not None:
            try:
                await self.on_drained(uid)
            except Exception:
                log.exception("on_drained callback failed for job %s", uid, extra=job_extra(uid))
