"""The DISPATCH action: load the items, record them, write their state, publish from the cursor.

Resumable and idempotent (failure-modes rows 9 and 14): the item ids go to the ledger and the
per-item state is complete before the first publish, every task carries a dedup id, and the
cursor in the status says where a restarted operator resumes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import ValidationError

from mljob.adapters import jetstream
from mljob.adapters.services import Services
from mljob.adapters.tasks import (
    DispatchInterrupted,
    DispatchTarget,
    SourceNotReady,
    TaskEncoder,
    load_items,
    publish_items,
    task_publisher,
)
from mljob.api.models import Phase
from mljob.controller.actions import finish
from mljob.controller.actions.redispatch import (
    begin_recreation,
    end_recreation,
    ensure_stream_and_registry,
    recreation_in_progress,
    republish_unresolved,
)
from mljob.controller.actions.state import ensure_state
from mljob.controller.jobview import JobView, now_iso, target_of
from mljob.core import reconcile
from mljob.core.items import ItemIds, ItemSourceError
from mljob.ops import metrics

log = logging.getLogger(__name__)

#: At most one status write (cursor and progress) per this many seconds while publishing.
DISPATCH_STATUS_INTERVAL_SECONDS = 1.0


async def dispatch(services: Services, view: JobView) -> None:
    try:
        target = await target_of(view)
    except ValidationError as err:
        first = err.errors()[0]
        await fail_early(
            services, view, "InvalidSpec", f"spec.{'.'.join(map(str, first['loc']))}: {first['msg']}"
        )
        return
    spec = target.spec
    snapshot_spec = spec.model_dump(by_alias=True, exclude={"items"}, exclude_none=True)
    await services.jobs.ensure(view.ref.uid, view.ref.namespace, view.ref.name, spec.pipeline, snapshot_spec)
    try:
        items = await load_items(target, services.kube.configmap_data)
    except SourceNotReady as err:
        await view.set_conditions(
            ("ItemsSourceReady", "False", "ItemsSourceMissing", str(err)),
            extra={} if view.phase else {"phase": Phase.PENDING.value},
        )
        return
    except ItemSourceError as err:
        await fail_early(services, view, "InvalidItems", str(err))
        return
    # A job whose tasks fit one chunk goes straight to Running in one status write after
    # publishing (a restart before it publishes again, deduplicated): with a thousand MLJobs
    # starting at once, every write per job counts.
    one_write = view.phase in (None, Phase.PENDING) and len(items) <= services.settings.dispatch_chunk
    if view.phase in (None, Phase.PENDING) and not one_write:
        await _mark_dispatching(services, view, len(items), spec.pipeline)
    elif view.has_condition("ItemsSourceReady", "False"):
        await view.set_conditions(("ItemsSourceReady", "True", "ItemsLoaded", f"{len(items)} items loaded"))
    ids = ItemIds(items)  # read through: no second list of the ids
    # The ledger knows every item (with its fields: re-dispatch rebuilds tasks from it), then
    # Redis; both before any task can be published (row 9).
    await services.results.register_items(view.ref.uid, items)
    await ensure_state(services, view.ref.uid, ids)
    existed = await jetstream.job_consumer_exists(services.js, spec.pipeline, view.ref.uid)
    entry = await ensure_stream_and_registry(services, target)
    cursor = int(view.status.get("dispatchCursor", 0))
    if (not existed and cursor > 0) or recreation_in_progress(view):
        # The stream or the job's consumer vanished mid-dispatch, maybe with the tasks published
        # so far (row 11).
        await begin_recreation(services, view)
        republished = await republish_unresolved(services, target, ids[:cursor])
        await end_recreation(services, view, republished)
    await jetstream.register_job(services.registry, entry)
    if await _publish_from_cursor(services, view, target, items, write_cursor=not one_write):
        await _mark_running(services, view, len(items), spec.pipeline, first_write=one_write)


def _started_fields(view: JobView, phase: Phase, total: int, published: int) -> dict[str, Any]:
    """The status of a job whose dispatch begins (Dispatching) or that went straight to Running."""
    dispatched = ("Dispatched", "False", "Dispatching", f"publishing {total} tasks")
    if published == total:
        dispatched = ("Dispatched", "True", "AllTasksPublished", f"{total} tasks published")
    return {
        "phase": phase.value,
        "total": total,
        "dispatched": published,
        "dispatchCursor": published,
        "processed": 0,
        "failed": 0,
        "pending": total,
        "progress": "0%",
        "startTime": view.status.get("startTime") or now_iso(),
        "observedGeneration": view.generation,
        "conditions": view.conditions_with(
            ("ItemsSourceReady", "True", "ItemsLoaded", f"{total} items loaded"),
            dispatched,
            *([_progressing(total)] if phase is Phase.RUNNING else []),
        ),
    }


def _progressing(total: int) -> tuple[str, str, str, str]:
    """The condition the job loop's first progress tick would add: written with Running, that
    tick writes nothing (one status write from nothing to Running, not two)."""
    return ("Progressing", "True", "ItemsProcessing", f"0 of {total} items processed")


async def _mark_dispatching(services: Services, view: JobView, total: int, pipeline: str) -> None:
    await view.write(_started_fields(view, Phase.DISPATCHING, total, 0))
    await services.jobs.set_phase(view.ref.uid, Phase.DISPATCHING, services.settings.actor)
    await services.kube.event(view.ref, "Dispatching", f"publishing {total} tasks to pipeline {pipeline}")


async def _publish_from_cursor(
    services: Services,
    view: JobView,
    target: DispatchTarget,
    items: list[Any],
    write_cursor: bool = True,
) -> bool:
    """Publish the items not yet covered by the cursor; False when cancelled meanwhile.

    One window of outstanding acks spans every chunk, so publishing never pauses between
    chunks. At most once a second the status gets the cursor (every task before it confirmed by
    the stream) and the progress so far: workers start on the first chunk and `processed`
    moves while a long dispatch goes on. A failed or unconfirmed publish ends the step with the
    cursor at what was confirmed; the next tick resumes there (the dedup ids make re-sending
    the unconfirmed ones harmless), so a NATS restart mid-dispatch never hangs the job.
    """
    settings = services.settings
    start = int(view.status.get("dispatchCursor", 0))
    publisher = task_publisher(services.js, settings)
    reported = {"cursor": start, "at": time.monotonic()}

    async def report(cursor: int, force: bool = False) -> None:
        metrics.TASKS_DISPATCHED.inc(cursor - reported["cursor"])
        due = force or time.monotonic() - reported["at"] >= DISPATCH_STATUS_INTERVAL_SECONDS
        reported["cursor"] = cursor
        if write_cursor and due:
            reported["at"] = time.monotonic()
            await _write_dispatch_progress(services, view, cursor)

    try:
        cursor = await publish_items(
            publisher,
            TaskEncoder(target),
            items,
            start,
            settings.dispatch_chunk,
            on_progress=report,
            keep_going=lambda: not view.spec.get("cancel"),
        )
    except DispatchInterrupted:
        await report(start + publisher.confirmed, force=True)
        raise
    await report(cursor, force=True)
    return cursor >= len(items)


async def _write_dispatch_progress(services: Services, view: JobView, cursor: int) -> None:
    """The cursor, and the counts so far (the job loop does not observe while it dispatches)."""
    fields: dict[str, Any] = {"dispatchCursor": cursor, "dispatched": cursor}
    counts = await services.state.counts(view.ref.uid)
    if counts is not None:
        fields.update(reconcile.progress_fields(counts, cursor))
    await view.write(fields)
    if counts is not None and view.phase is not None:
        await services.jobs.progress(view.ref.uid, view.phase, counts, cursor, services.settings.actor)


async def _mark_running(
    services: Services, view: JobView, total: int, pipeline: str, first_write: bool = False
) -> None:
    """Running once every task is published; `first_write`: the job's whole status at once."""
    if first_write:
        await view.write(_started_fields(view, Phase.RUNNING, total, total))
    else:
        await view.write(
            {
                "phase": Phase.RUNNING.value,
                "conditions": view.conditions_with(
                    ("Dispatched", "True", "AllTasksPublished", f"{total} tasks published"),
                    _progressing(total),
                ),
            }
        )
    await services.jobs.set_phase(view.ref.uid, Phase.RUNNING, services.settings.actor, dispatched=total)
    await services.kube.event(view.ref, "Running", f"all {total} tasks published to pipeline {pipeline}")


async def fail_early(services: Services, view: JobView, reason: str, message: str) -> None:
    """A job whose spec or items are unusable fails before anything is dispatched."""
    log.info("job %s/%s failed: %s", view.ref.namespace, view.ref.name, message)
    if view.phase is None:
        await view.write({"phase": Phase.PENDING.value})
    await finish.finish(services, view, reconcile.Verdict(Phase.FAILED, reason, message))
