"""mljob's JetStream names and settings, for the baselines that use NATS.

The stack's NATS grants each identity rights on mljob's names only: the operator publishes tasks
on `mljob.tasks.<pipeline>.<uid>` and manages streams, a worker pulls and acks from a job
consumer of a `MLJOB_TASKS_<pipeline>` stream and publishes results on
`mljob.results.<pipeline>.<uid>`, the collector reads `MLJOB_RESULTS` through its one consumer
`collector`. So the baselines use those names (from mljob.protocol, the wire contract of
docs/protocol.md) with pipelines of their own (`bench-...`), each role connecting as the stack's
identity for it, and create streams and consumers with mljob's settings: the same JetStream work
as mljob, on the same terms. A stack without identities (plain `nats://`) works the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from mljob import protocol

#: mljob's duplicate window of its streams (mljob.adapters.jetstream).
DUPLICATE_WINDOW_SECONDS = 2 * 3600.0
#: The stack's variables holding each role's identity (the operator's is MLJOB_NATS_USER itself).
ROLE_IDENTITIES = {"worker": "MLJOB_DEV_NATS_WORKER", "collector": "MLJOB_DEV_NATS_COLLECTOR"}


@dataclass(frozen=True)
class Job:
    """One job of a benchmark's pipeline, and its names on the wire."""

    pipeline: str
    uid: str

    @property
    def task_stream(self) -> str:
        return protocol.task_stream(self.pipeline)

    @property
    def task_subject(self) -> str:
        return protocol.task_subject(self.pipeline, self.uid)

    @property
    def task_consumer(self) -> str:
        return protocol.task_consumer(self.uid)

    @property
    def results_subject(self) -> str:
        return protocol.results_subject(self.pipeline, self.uid)


RESULTS_STREAM = protocol.RESULTS_STREAM
RESULTS_CONSUMER = protocol.RESULTS_CONSUMER


def identity_env(env: Mapping[str, str], role: str) -> dict[str, str]:
    """`env` with MLJOB_NATS_USER/PASSWORD of the stack's identity for `role`, when it has one."""
    prefix = ROLE_IDENTITIES.get(role)
    out = dict(env)
    if prefix and env.get(f"{prefix}_USER"):
        out["MLJOB_NATS_USER"] = env[f"{prefix}_USER"]
        out["MLJOB_NATS_PASSWORD"] = env.get(f"{prefix}_PASSWORD", "")
    return out


async def create_job_consumer(js: Any, job: Job, max_ack_pending: int = 1000) -> None:
    """The pipeline's work-queue stream (when missing) and the job's durable pull consumer,
    configured as mljob's (max_deliver 2, ack_wait 60 s: an MLJob's defaults)."""
    try:
        await js.stream_info(job.task_stream)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=job.task_stream,
                subjects=[protocol.task_stream_subjects(job.pipeline)],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
                discard=DiscardPolicy.OLD,
            )
        )
    await js.add_consumer(
        job.task_stream,
        ConsumerConfig(
            durable_name=job.task_consumer,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=2,
            ack_wait=60.0,
            max_ack_pending=max_ack_pending,
            filter_subject=job.task_subject,
        ),
    )


async def delete_pipeline_stream(js: Any, pipeline: str) -> None:
    """Delete a benchmark pipeline's task stream (with its consumers); nothing else uses it."""
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(protocol.task_stream(pipeline))


async def ensure_results(js: Any) -> int:
    """The shared results stream and the collector's consumer, as mljob creates them.

    Returns how many results are already waiting there (another run's): the baseline's collector
    would take them, so the caller refuses to run then.
    """
    try:
        await js.stream_info(RESULTS_STREAM)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=RESULTS_STREAM,
                subjects=[f"{protocol.RESULTS_SUBJECT_PREFIX}.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
            )
        )
    info = await js.add_consumer(
        RESULTS_STREAM,
        ConsumerConfig(
            durable_name=RESULTS_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=-1,
            ack_wait=30.0,
            max_ack_pending=20_000,
        ),
    )
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
