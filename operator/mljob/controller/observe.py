"""Observation: turn what Redis, NATS and the MLJob say into a `core.reconcile.Snapshot`."""

from __future__ import annotations

import time

from nats.js.errors import NotFoundError

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.services import Services
from mljob.controller.jobview import JobView, parse_time
from mljob.core import reconcile
from mljob.core.counts import ItemCounts


async def stream_view(
    services: Services, pipeline: str, uid: str, generation: int = 0
) -> reconcile.StreamView:
    """The job's consumer counters; whether its pipeline's stream exists when the consumer is
    missing; whether the consumer answers when the stream does (raises when neither does: NATS
    itself is away, and the tick is retried)."""
    stream = protocol.task_stream(pipeline)
    try:
        info = await services.js.consumer_info(stream, protocol.task_consumer(uid, generation))
    except NotFoundError:
        exists = await jetstream.pipeline_stream_exists(services.js, pipeline)
        return reconcile.StreamView(stream_exists=exists, consumer_exists=False)
    except jetstream.NOT_ANSWERING as err:
        if not jetstream.not_answering(err):
            raise
        exists = await jetstream.pipeline_stream_exists(services.js, pipeline)
        return reconcile.StreamView(stream_exists=exists, consumer_exists=exists, consumer_answers=not exists)
    last = info.delivered.last_active if info.delivered is not None else None
    return reconcile.StreamView(
        stream_exists=True,
        consumer_exists=True,
        num_pending=int(info.num_pending or 0),
        num_redelivered=int(info.num_redelivered or 0),
        num_ack_pending=int(info.num_ack_pending or 0),
        last_delivery=last.timestamp() if last is not None else None,
    )


def _latest(*moments: float | None) -> float | None:
    known = [m for m in moments if m is not None]
    return max(known) if known else None


def snapshot(
    services: Services,
    view: JobView,
    counts: ItemCounts | None,
    stream: reconcile.StreamView | None,
    watching_since: float,
    consumer_silent_since: float | None = None,
) -> reconcile.Snapshot:
    """Every fact a decision uses, the clock and all activity signals included."""
    spec = view.spec
    status = view.status
    heartbeat = services.heartbeats.get(view.ref.uid)
    deadline = spec.get("activeDeadlineSeconds")
    ttl = spec.get("ttlSecondsAfterFinished")
    return reconcile.Snapshot(
        phase=view.phase,
        cancel=bool(spec.get("cancel", False)),
        failure_threshold=float(spec.get("failureThreshold", 0.5)),
        dispatched=int(status.get("dispatchCursor", 0)),
        total=status.get("total"),
        counts=counts,
        now=time.time(),
        start_time=parse_time(status.get("startTime")),
        completion_time=parse_time(status.get("completionTime")),
        last_activity=_latest(
            counts.last_activity if counts else None,
            heartbeat,
            stream.last_delivery if stream else None,
            watching_since,
        ),
        active_deadline_seconds=int(deadline) if deadline is not None else None,
        ttl_seconds_after_finished=int(ttl) if ttl is not None else None,
        stall_timeout_seconds=int(spec.get("stallTimeoutSeconds", 600)),
        stream=stream,
        stream_recreations=int(status.get("streamRecreations", 0)),
        max_stream_recreations=services.settings.max_stream_recreations,
        stream_recreation_pending=view.has_condition("StreamAvailable", "False"),
        consumer_silent_since=consumer_silent_since,
        consumer_replace_seconds=services.settings.consumer_replace_seconds,
        state_unavailable=view.has_condition("StateAvailable", "False"),
    )
