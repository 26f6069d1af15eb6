"""mljob's JetStream names and settings, for the baselines that use NATS.

The stack's NATS grants each identity rights on mljob's names only: the operator publishes tasks
on `mljob.tasks.<pipeline>.<uid>` and manages streams, a worker pulls and acks from a job
consumer of a `MLJOB_TASKS_<pipeline>` stream and publishes results on
`mljob.results.<pipeline>.<uid>`, the collector reads `MLJOB_RESULTS` through its one consumer
`collector`. So the baselines use those names (from mljob.protocol, the wire contract of
docs/protocol.md) with pipelines of their own (`bench-...`), each role connecting as the stack's
identity for it, and create streams and consumers with mljob's own adapter (set-up, outside the
measured work): the same JetStream work as mljob, on the same terms. A stack without identities
(plain `nats://`) works the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nats.js.errors import NotFoundError

from mljob import protocol
from mljob.adapters import jetstream
from mljob_dev.devstack import nats_config


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
    """`env` with the MLJOB_NATS_* settings of the stack's identity for `role`."""
    return {**env, **nats_config.role_env(env, role)}


async def create_job_consumer(js: Any, job: Job, max_ack_pending: int = 1000) -> None:
    """The pipeline's work-queue stream (when missing) and the job's durable pull consumer, made
    by mljob's own adapter with an MLJob's defaults (max_deliver 2, ack_wait 60 s)."""
    await jetstream.ensure_job_stream(
        js,
        jetstream.JobStreamSettings(
            uid=job.uid,
            namespace="bench",
            name=job.uid,
            pipeline=job.pipeline,
            max_ack_pending=max_ack_pending,
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
    await jetstream.ensure_results_stream(js)
    info = await js.consumer_info(RESULTS_STREAM, RESULTS_CONSUMER)
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
