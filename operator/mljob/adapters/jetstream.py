"""JetStream streams, consumers and the job registry (a key-value bucket workers watch)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RawStreamMsg,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
    BadRequestError,
    BucketNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue
from pydantic import ValidationError

from mljob import protocol
from mljob.core.orphans import is_job_uid

#: JetStream's error code for a consumer whose servers are all known to be offline (a server
#: stopped cleanly, or one NATS has noticed is gone): answered at once, as a 500.
CONSUMER_OFFLINE_CODE = 10119

#: What a request to a consumer whose one server does not answer may raise (the server down, or
#: the consumer's leader not elected yet); `not_answering` says which of them mean that.
NOT_ANSWERING = (TimeoutError, NoRespondersError, APIError)


def not_answering(err: BaseException) -> bool:
    """Whether a consumer request failed because the consumer's server is away: it timed out
    (nats' TimeoutError is a TimeoutError too), nobody answered, JetStream said 503, or it said
    the consumer is offline."""
    if isinstance(err, (TimeoutError, NoRespondersError, ServiceUnavailableError)):
        return True
    return isinstance(err, APIError) and err.err_code == CONSUMER_OFFLINE_CODE


#: Long enough that an operator restarted after a crash re-publishes into the dedup window.
DUPLICATE_WINDOW_SECONDS = 2 * 3600.0
RESULTS_ACK_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class JobStreamSettings:
    uid: str
    namespace: str
    name: str
    pipeline: str
    max_deliver: int = 2
    ack_wait_seconds: float = 60.0
    max_ack_pending: int = 1000
    replicas: int = 1
    #: The job consumer's replicas; None: one on a limits stream, the stream's on a work-queue
    #: stream (which accepts no other, NATS error 10134).
    consumer_replicas: int | None = None
    #: Which of the job's consumers (`protocol.task_consumer`): 0, or its Nth replacement.
    consumer_generation: int = 0


def task_stream_retention(replicas: int) -> RetentionPolicy:
    """Work queue on one server, limits when replicated. Why: a replicated work-queue stream
    accepts only consumers of its own replica count, so every job's consumer would be a RAFT
    group of its own (68 ms to create on the 3-node stack, and the cluster's load grows with
    every running MLJob: nats-server #5451). A limits stream takes R1 consumers (8 ms, no RAFT
    group); the price is that a task stays stored until its job's cleanup purges it rather
    than until its ACK (docs/architecture.md, "Scale")."""
    return RetentionPolicy.WORK_QUEUE if replicas <= 1 else RetentionPolicy.LIMITS


def job_consumer_replicas(retention: RetentionPolicy | str | None, configured: int | None) -> int | None:
    """The replicas a job's consumer is created with (None: the stream's)."""
    if configured is not None:
        return configured
    return 1 if retention == RetentionPolicy.LIMITS else None  # the server's answer is a plain str


async def ensure_job_stream(
    js: JetStreamContext, settings: JobStreamSettings, consumer_timeout: float | None = None
) -> protocol.RegistryEntry:
    """Create (idempotently) the pipeline's task stream and the job's durable pull consumer.

    The stream is shared by the pipeline's jobs; each job's consumer is filtered to the job's own
    subject, so the consumers never overlap (a work-queue stream requires that). The consumer is
    R1 on a replicated (limits) stream, see `task_stream_retention`; a stream created before
    keeps its retention, and its consumers their rule. `consumer_timeout` bounds the consumer's
    creation (the connection's request timeout when None).
    """
    stream, retention = await _pipeline_stream(js, settings.pipeline, settings.replicas)
    subject = protocol.task_subject(settings.pipeline, settings.uid)
    consumer = protocol.task_consumer(settings.uid, settings.consumer_generation)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=consumer,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=settings.max_deliver,
            ack_wait=float(settings.ack_wait_seconds),
            max_ack_pending=settings.max_ack_pending,
            filter_subject=subject,
            num_replicas=job_consumer_replicas(retention, settings.consumer_replicas),
        ),
        timeout=consumer_timeout,
    )
    return protocol.RegistryEntry(
        uid=settings.uid,
        namespace=settings.namespace,
        name=settings.name,
        pipeline=settings.pipeline,
        stream=stream,
        consumer=consumer,
        subject=subject,
        created=protocol.utcnow(),
    )


async def ensure_pipeline_stream(js: JetStreamContext, pipeline: str, replicas: int = 1) -> str:
    """The pipeline's task stream, created when missing (never reconfigured); returns its name."""
    stream, _ = await _pipeline_stream(js, pipeline, replicas)
    return stream


async def _pipeline_stream(
    js: JetStreamContext, pipeline: str, replicas: int
) -> tuple[str, RetentionPolicy | str | None]:
    """The stream's name and retention (as stored: an existing stream is never reconfigured)."""
    stream = protocol.task_stream(pipeline)
    config = StreamConfig(
        name=stream,
        subjects=[protocol.task_stream_subjects(pipeline)],
        retention=task_stream_retention(replicas),
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        discard=DiscardPolicy.OLD,
    )
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        try:
            info = await js.add_stream(config)
        except BadRequestError:  # another job of the pipeline created it meanwhile
            info = await js.stream_info(stream)
    return stream, info.config.retention


#: Seconds a replaced consumer's deletion may take: its server is likely lost, and the request
#: then times out; the orphan sweep removes one that comes back.
OLD_CONSUMER_DELETE_TIMEOUT = 2.0


async def delete_job_tasks(js: JetStreamContext, pipeline: str, uid: str, generation: int = 0) -> bool:
    """Purge the job's tasks from its pipeline's stream, then delete its consumer (and, best
    effort, the consumers it replaced). True when the consumer was there. The consumer goes
    last: it marks a job whose tasks may be left, so an interrupted cleanup is found again (by
    the job's loop or the orphan sweep)."""
    stream = protocol.task_stream(pipeline)
    try:
        purged = await js.purge_stream(stream, subject=protocol.task_subject(pipeline, uid))
    except NotFoundError:
        return False
    for replaced in range(generation):
        await delete_replaced_consumer(js, pipeline, uid, replaced)
    try:
        deleted = await js.delete_consumer(stream, protocol.task_consumer(uid, generation))
    except NotFoundError:
        deleted = False
    return bool(purged and deleted)


async def delete_replaced_consumer(js: JetStreamContext, pipeline: str, uid: str, generation: int) -> bool:
    """Delete a consumer the job replaced, if it can be: True when deleted, False when it is
    gone already or its server does not answer (never raises for that)."""
    stream, consumer = protocol.task_stream(pipeline), protocol.task_consumer(uid, generation)
    try:
        await asyncio.wait_for(js.delete_consumer(stream, consumer), OLD_CONSUMER_DELETE_TIMEOUT)
    except NotFoundError:
        return False
    except NOT_ANSWERING as err:
        if not not_answering(err):
            raise
        return False
    return True


async def job_task_count(js: JetStreamContext, pipeline: str, uid: str) -> int:
    """How many of the job's tasks its pipeline's stream holds (0 when the stream is gone)."""
    subject = protocol.task_subject(pipeline, uid)
    try:
        info = await js.stream_info(protocol.task_stream(pipeline), subjects_filter=subject)
    except NotFoundError:
        return 0
    return int((info.state.subjects or {}).get(subject, 0))


async def job_consumer_exists(js: JetStreamContext, pipeline: str, uid: str, generation: int = 0) -> bool:
    try:
        await js.consumer_info(protocol.task_stream(pipeline), protocol.task_consumer(uid, generation))
    except NotFoundError:
        return False
    return True


async def pipeline_stream_exists(js: JetStreamContext, pipeline: str) -> bool:
    try:
        await js.stream_info(protocol.task_stream(pipeline))
    except NotFoundError:
        return False
    return True


async def ensure_results_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """The shared results stream and the collector's durable consumer (never drops a result)."""
    await _ensure_stream_and_consumer(
        js,
        StreamConfig(
            name=protocol.RESULTS_STREAM,
            subjects=[f"{protocol.RESULTS_SUBJECT_PREFIX}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        ),
        ConsumerConfig(
            durable_name=protocol.RESULTS_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=-1,
            ack_wait=RESULTS_ACK_WAIT_SECONDS,
            max_ack_pending=20_000,
        ),
    )


async def _ensure_stream_and_consumer(
    js: JetStreamContext, stream: StreamConfig, consumer: ConsumerConfig
) -> None:
    """A shared stream, created when missing (never reconfigured), and its durable consumer."""
    assert stream.name is not None
    try:
        await js.stream_info(stream.name)
    except NotFoundError:
        await js.add_stream(stream)
    await js.add_consumer(stream.name, consumer)


async def registry(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """The job registry bucket, created on first use."""
    try:
        return await js.key_value(protocol.REGISTRY_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=protocol.REGISTRY_BUCKET, history=1, replicas=replicas)
        )


async def register_job(kv: KeyValue, entry: protocol.RegistryEntry) -> None:
    await kv.put(protocol.registry_key(entry.pipeline, entry.uid), entry.encode())


async def unregister_job(kv: KeyValue, pipeline: str, uid: str) -> None:
    await kv.purge(protocol.registry_key(pipeline, uid))


#: How long an unprocessed max-deliveries advisory is kept (an operator down longer loses it).
ADVISORY_MAX_AGE_SECONDS = 24 * 3600.0
ADVISORY_ACK_WAIT_SECONDS = 30.0
#: JetStream's error code for "stream not found" (a missing message is another 404: 10037).
STREAM_NOT_FOUND_CODE = 10059


class JobStreamMissing(LookupError):
    """The job's task stream is gone (NATS lost it): nothing is left to resolve in it."""


async def ensure_advisory_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """The stream capturing max-deliveries advisories, and the operator's durable consumer on it.

    Advisories are core NATS messages: without a stream, one published while the operator is down
    is lost and its item stays pending forever (failure-modes row 2). Limits retention keeps the
    last day for inspection; the consumer's ack position is what the operator has handled.
    """
    await _ensure_stream_and_consumer(
        js,
        StreamConfig(
            name=protocol.ADVISORY_STREAM,
            subjects=[protocol.MAX_DELIVERIES_ADVISORY_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=ADVISORY_MAX_AGE_SECONDS,
            discard=DiscardPolicy.OLD,
        ),
        ConsumerConfig(
            durable_name=protocol.ADVISORY_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=-1,
            ack_wait=ADVISORY_ACK_WAIT_SECONDS,
            max_ack_pending=10_000,
        ),
    )


async def get_task_message(js: JetStreamContext, pipeline: str, uid: str, seq: int) -> RawStreamMsg | None:
    """The job's task message at `seq` of its pipeline's stream; None when it is gone (acked or
    deleted) or when that sequence holds another job's task (the stream was recreated since).

    Raises JobStreamMissing when the pipeline's stream itself is gone.
    """
    stream = protocol.task_stream(pipeline)
    try:
        msg = await js.get_msg(stream, seq)
    except NotFoundError as err:
        if err.err_code == STREAM_NOT_FOUND_CODE:
            raise JobStreamMissing(stream) from err
        return None
    return msg if msg.subject == protocol.task_subject(pipeline, uid) else None


async def delete_task_message(js: JetStreamContext, pipeline: str, seq: int) -> bool:
    """Delete the task message at `seq`; False when it (or the stream) was already gone."""
    try:
        return bool(await js.delete_msg(protocol.task_stream(pipeline), seq))
    except NotFoundError:
        return False


@dataclass(frozen=True)
class JobConsumerInfo:
    """A job's consumer on its pipeline's stream, as the orphan sweep sees it."""

    uid: str
    pipeline: str
    created: datetime | None
    generation: int = 0

    @property
    def name(self) -> str:
        """`<stream>/<consumer>`: what a human reads in a log line (it carries the UID)."""
        return f"{protocol.task_stream(self.pipeline)}/{protocol.task_consumer(self.uid, self.generation)}"


def job_of_consumer(stream_name: str, consumer_name: str) -> tuple[str, str] | None:
    """(pipeline, uid) when this is a job's consumer on a pipeline's task stream, else None.

    Only ``workers-<uuid>`` (or its replacement ``workers-<uuid>-r<N>``) on
    ``MLJOB_TASKS_<pipeline>`` qualifies: shared streams (MLJOB_RESULTS,
    advisories) and foreign consumers are never a job's.
    """
    if not stream_name.startswith(protocol.TASK_STREAM_PREFIX):
        return None
    pipeline = stream_name[len(protocol.TASK_STREAM_PREFIX) :]
    parsed = protocol.parse_task_consumer(consumer_name)
    if parsed is None:
        return None
    uid = parsed[0]
    return (pipeline, uid) if pipeline and is_job_uid(uid) else None


async def _pages(fetch: Any) -> list[Any]:
    """Every entry of a paged JetStream listing (the server returns at most 256 per request)."""
    found: list[Any] = []
    while True:
        page = await fetch(len(found))
        if not page:
            return found
        found.extend(page)


async def list_job_consumers(js: JetStreamContext) -> list[JobConsumerInfo]:
    """Every job consumer on every pipeline's task stream."""
    streams = await _pages(js.streams_info)
    found: list[JobConsumerInfo] = []
    for info in streams:
        name = str(info.config.name or "")
        if not name.startswith(protocol.TASK_STREAM_PREFIX):
            continue
        try:
            consumers = await _pages(lambda offset, name=name: js.consumers_info(name, offset))
        except NotFoundError:
            continue  # deleted since the listing
        for consumer in consumers:
            job = job_of_consumer(name, str(consumer.name or ""))
            parsed = protocol.parse_task_consumer(str(consumer.name or ""))
            if job is not None and parsed is not None:
                found.append(
                    JobConsumerInfo(
                        uid=job[1], pipeline=job[0], created=consumer.created, generation=parsed[1]
                    )
                )
    return found


@dataclass(frozen=True)
class RegistryListing:
    """One registry key; ``entry`` is None when its value cannot be parsed."""

    key: str
    pipeline: str
    uid: str
    entry: protocol.RegistryEntry | None


async def list_registry(js: JetStreamContext, kv: KeyValue) -> list[RegistryListing]:
    """Every live key of the job registry with its parsed entry (purged keys are skipped).

    The keys come from one stream-info request with a subjects filter, not from a KV watcher:
    a watcher's end-of-snapshot marker can arrive before every key under load, and a sweep that
    misses a key silently leaves it behind.
    """
    prefix = f"$KV.{protocol.REGISTRY_BUCKET}."
    info = await js.stream_info(f"KV_{protocol.REGISTRY_BUCKET}", subjects_filter=f"{prefix}>")
    listed: list[RegistryListing] = []
    for subject in sorted((info.state.subjects or {}).keys()):
        key = subject.removeprefix(prefix)
        pipeline, _, uid = key.rpartition(".")
        if not pipeline or not uid:
            continue
        try:
            value = (await kv.get(key)).value or b""
        except NotFoundError:
            continue  # purged (only its marker is left) or deleted since the listing
        try:
            entry: protocol.RegistryEntry | None = protocol.RegistryEntry.model_validate_json(value)
        except ValidationError:
            entry = None
        listed.append(RegistryListing(key=key, pipeline=pipeline, uid=uid, entry=entry))
    return listed
