"""The REDISPATCH action: a job's stream or consumer vanished (row 11).

Recreate them (same names, so workers pick them up by themselves when they rebind), put the
registry entry back, and publish again every item without a result row, as the ledger recorded
it at dispatch: the item source may have been edited since (an item removed from a ConfigMap
must still be re-published), or be gone. Bounded by `max_stream_recreations`; after that the job
fails with `StreamLost`. Dispatch uses `republish_unresolved` too, when the stream vanished
before every task was published.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.services import Services
from mljob.adapters.tasks import DispatchTarget, TaskEncoder, publish_items, stream_settings, task_publisher
from mljob.controller.jobview import JobView, target_of
from mljob.ops import metrics

log = logging.getLogger(__name__)


async def republish_unresolved(
    services: Services, target: DispatchTarget, among: Sequence[str] | None = None
) -> int:
    """Publish every item without a result row (only those of `among` when given), built from
    the ledger's record of the item; returns how many. Raises DispatchInterrupted when the
    stream did not confirm them all in time (the caller's step fails and the next tick carries
    the recreation through: the dedup ids make it harmless)."""
    todo = await services.results.unresolved_item_records(target.uid)
    if among is not None:
        wanted = set(among)
        todo = [item for item in todo if item["id"] in wanted]
    publisher = task_publisher(services.js, services.settings)
    await publish_items(publisher, TaskEncoder(target), todo, 0, services.settings.dispatch_chunk)
    return len(todo)


def recreation_in_progress(view: JobView) -> bool:
    """A recreation was begun (counted, announced) and not yet seen through."""
    return view.has_condition("StreamAvailable", "False")


async def begin_recreation(services: Services, view: JobView) -> None:
    """Count the loss and say so BEFORE acting: a crash or an error halfway through leaves
    `StreamAvailable=False`, and the next tick carries the recreation through (republishing is
    idempotent by `Nats-Msg-Id`), without counting it twice."""
    if recreation_in_progress(view):
        return
    attempt = int(view.status.get("streamRecreations", 0)) + 1
    message = (
        f"the job's stream or consumer is missing; recreating it and re-dispatching the items without "
        f"a result (attempt {attempt} of {services.settings.max_stream_recreations})"
    )
    log.warning("job %s/%s (%s): %s", view.ref.namespace, view.ref.name, view.ref.uid, message)
    await view.set_conditions(
        ("StreamAvailable", "False", "Recreating", message),
        extra={"streamRecreations": attempt, "diagnostics": view.with_diagnostic("StreamRecreated", message)},
    )
    await services.kube.event(view.ref, "StreamRecreated", message, warning=True)


async def end_recreation(services: Services, view: JobView, republished: int) -> None:
    metrics.ITEMS_LOST.labels(cause="StreamRecreated").inc(republished)
    message = f"recreated the job's stream and re-dispatched {republished} items without a result"
    log.info("job %s/%s (%s): %s", view.ref.namespace, view.ref.name, view.ref.uid, message)
    await view.set_conditions(("StreamAvailable", "True", "StreamRecreated", message))


async def redispatch(services: Services, view: JobView) -> int:
    """Recreate and re-publish; returns how many tasks were published again."""
    target = await target_of(view)
    await begin_recreation(services, view)
    entry = await ensure_stream_and_registry(services, target)
    republished = await republish_unresolved(services, target)
    await jetstream.register_job(services.registry, entry)
    await end_recreation(services, view, republished)
    return republished


async def ensure_stream_and_registry(
    services: Services, target: DispatchTarget, consumer_timeout: float | None = None
) -> protocol.RegistryEntry:
    """The job's stream and consumer, and the registry bucket (NATS may have lost it too)."""
    settings = services.settings
    await jetstream.registry(services.js, settings.stream_replicas)
    return await jetstream.ensure_job_stream(
        services.js,
        stream_settings(
            target, settings.stream_replicas, settings.max_ack_pending, settings.consumer_replicas
        ),
        consumer_timeout,
    )
