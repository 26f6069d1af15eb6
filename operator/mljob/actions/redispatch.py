"""The REDISPATCH action: a running job's stream or consumer vanished (row 11).

Recreate them (same names, so workers pick them up by themselves when they rebind), put the
registry entry back, and publish again every item without a result row, from the job's item
source. Bounded by `max_stream_recreations`; after that the job fails with `StreamLost`.
"""

from __future__ import annotations

import logging

from mljob.actions.dispatch import target_of
from mljob.adapters import jetstream
from mljob.dispatch import load_items, publish_chunk, stream_settings, task_bodies
from mljob.jobview import JobView
from mljob.services import Services

log = logging.getLogger(__name__)


async def redispatch(services: Services, view: JobView) -> int:
    """Recreate and re-publish; returns how many tasks were published again."""
    target = target_of(view)
    settings = services.settings
    entry = await jetstream.ensure_job_stream(
        services.js, stream_settings(target, settings.stream_replicas, settings.max_ack_pending)
    )
    unresolved = set(await services.results.unresolved_items(view.ref.uid))
    items = [
        item for item in await load_items(target, services.kube.configmap_data) if item["id"] in unresolved
    ]
    for start in range(0, len(items), settings.dispatch_chunk):
        chunk = items[start : start + settings.dispatch_chunk]
        await publish_chunk(services.js, entry.subject, task_bodies(target, chunk))
    await jetstream.register_job(services.registry, entry)
    attempt = int(view.status.get("streamRecreations", 0)) + 1
    message = (
        f"the job's stream or consumer was missing; recreated it and re-dispatched {len(items)} items "
        f"without a result (attempt {attempt} of {settings.max_stream_recreations})"
    )
    log.warning("job %s/%s (%s): %s", view.ref.namespace, view.ref.name, view.ref.uid, message)
    await view.set_conditions(
        ("StreamAvailable", "True", "StreamRecreated", message),
        extra={"streamRecreations": attempt, "diagnostics": view.with_diagnostic("StreamRecreated", message)},
    )
    await services.kube.event(view.ref, "StreamRecreated", message, warning=True)
    return len(items)
