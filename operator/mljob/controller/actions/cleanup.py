"""Cleanup after a job: one idempotent function for completion, cancel, delete and the TTL (row 13)."""

from __future__ import annotations

import logging

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.kube import JobRef
from mljob.adapters.services import Services
from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.controller.actions.finish import ledger_counts
from mljob.controller.jobview import JobView
from mljob.ops import metrics

log = logging.getLogger(__name__)


async def cleanup_job(services: Services, uid: str, pipeline: str, generation: int = 0) -> None:
    """The registry entry, the job's tasks and consumer (of `generation`, and best effort the
    ones it replaced), the Redis keys. Safe to repeat.

    Without a pipeline (a spec that never validated) nothing was ever created in NATS.
    """
    if pipeline:
        await jetstream.unregister_job(services.registry, pipeline, uid)
        await jetstream.delete_job_tasks(services.js, pipeline, uid, generation)
    await services.state.delete(uid)
    services.heartbeats.forget(uid)
    metrics.CLEANUPS.inc()
    log.debug("cleaned up job %s (consumer %s)", uid, protocol.task_consumer(uid, generation))


async def mirror_terminal_to_postgres(services: Services, view: JobView) -> None:
    """A CR that is terminal while its row is not (a crash between the writes): fix the row."""
    phase = view.phase
    if phase is None or phase not in TERMINAL_PHASES:
        return
    row = await services.jobs.get(view.ref.uid)
    if row is not None and row.phase not in TERMINAL_PHASES:
        condition = {Phase.SUCCEEDED: "Complete", Phase.FAILED: "Failed"}.get(phase, "Cancelled")
        reason = next(
            (c.get("reason", "") for c in view.status.get("conditions", []) if c.get("type") == condition), ""
        )
        await services.jobs.finish(
            view.ref.uid, phase, reason, "mirrored from the MLJob status", None, services.settings.actor
        )


async def on_deleted(services: Services, ref: JobRef, pipeline: str, generation: int = 0) -> None:
    """The finalizer: clean up, and a job that was not terminal becomes Cancelled (reason
    Deleted) in Postgres, which keeps the history. Raises when NATS, Redis or Postgres is down,
    so kopf retries."""
    await cleanup_job(services, ref.uid, pipeline, generation)
    row = await services.jobs.get(ref.uid)
    if row is None or row.phase in TERMINAL_PHASES:
        return
    counts = await ledger_counts(services, ref.uid)
    outcome = await services.jobs.finish(
        ref.uid,
        Phase.CANCELLED,
        "Deleted",
        f"the MLJob {ref.namespace}/{ref.name} was deleted before it finished",
        counts,
        services.settings.actor,
    )
    if outcome.won:
        log.info(
            "job %s/%s (%s) deleted while %s: recorded as Cancelled",
            ref.namespace,
            ref.name,
            ref.uid,
            row.phase,
        )


async def delete_after_ttl(services: Services, view: JobView) -> None:
    """ttlSecondsAfterFinished has passed: delete the MLJob (Postgres keeps the row)."""
    log.info(
        "job %s/%s: ttlSecondsAfterFinished has passed; deleting the MLJob", view.ref.namespace, view.ref.name
    )
    await services.kube.delete_job(view.ref)
