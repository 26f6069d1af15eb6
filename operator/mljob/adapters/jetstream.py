"""JetStream streams, consumers and the job registry (a key-value bucket workers watch)."""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from mljob import protocol

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


async def ensure_job_stream(js: JetStreamContext, settings: JobStreamSettings) -> protocol.RegistryEntry:
    """Create (idempotently) the job's work-queue stream and its durable pull consumer."""
    stream = protocol.task_stream(settings.uid)
    subject = protocol.task_subject(settings.pipeline, settings.uid)
    consumer = protocol.task_consumer(settings.uid)
    config = StreamConfig(
        name=stream,
        subjects=[subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        discard=DiscardPolicy.OLD,
    )
    try:
        await js.stream_info(stream)
    except NotFoundError:
        await js.add_stream(config)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=consumer,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=settings.max_deliver,
            ack_wait=float(settings.ack_wait_seconds),
            max_ack_pending=settings.max_ack_pending,
            filter_subject=subject,
        ),
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


async def delete_job_stream(js: JetStreamContext, uid: str) -> bool:
    """Delete the job's stream (and with it its consumer). True when something was deleted."""
    try:
        return bool(await js.delete_stream(protocol.task_stream(uid)))
    except NotFoundError:
        return False


async def job_stream_exists(js: JetStreamContext, uid: str) -> bool:
    try:
        await js.stream_info(protocol.task_stream(uid))
    except NotFoundError:
        return False
    return True


async def ensure_results_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """The shared results stream and the collector's durable consumer (never drops a result)."""
    try:
        await js.stream_info(protocol.RESULTS_STREAM)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=protocol.RESULTS_STREAM,
                subjects=[f"{protocol.RESULTS_SUBJECT_PREFIX}.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
            )
        )
    await js.add_consumer(
        protocol.RESULTS_STREAM,
        ConsumerConfig(
            durable_name=protocol.RESULTS_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=-1,
            ack_wait=RESULTS_ACK_WAIT_SECONDS,
            max_ack_pending=20_000,
        ),
    )


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
