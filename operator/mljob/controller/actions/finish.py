"""The FINISH action: the guarded terminal transition on the ledger's exact counts.

The verdict is computed from Postgres (registered items and result rows), the store that
arbitrates, so the MLJob, the job row and the result rows always agree (rows 7, 8).
"""

from __future__ import annotations

import logging

from mljob.adapters.services import Services
from mljob.controller.actions import state
from mljob.controller.jobview import JobView
from mljob.controller.terminal import finish_job
from mljob.core import reconcile
from mljob.core.counts import ItemCounts

log = logging.getLogger(__name__)

#: The `StateAvailable=False` reason of a job Redis shows as done whose ledger has no items.
LEDGER_MISSING = "LedgerMissing"


async def ledger_counts(services: Services, uid: str) -> ItemCounts | None:
    """Counts from the results ledger; None for a job that never registered items."""
    total = await services.results.registered_count(uid)
    if total == 0:
        return None
    recorded, failed = await services.results.count(uid)
    return ItemCounts(total=total, pending=max(0, total - recorded), failed=failed)


async def finish(
    services: Services,
    view: JobView,
    verdict: reconcile.Verdict | None = None,
    decided_on: ItemCounts | None = None,
) -> bool:
    """Finish the job; True once the MLJob shows a terminal phase (else retry next tick).

    A `verdict` alone is applied as it is (cancel, deadline, lost stream, unusable items). With
    `decided_on`, the counts the core decided it on (the FINISH rule, from Redis), it is applied
    only once the ledger holds the same counts. Without a verdict (items just failed as lost) it
    follows the failure threshold on the ledger's counts. Missing outcomes never count as complete.
    """
    counts = await ledger_counts(services, view.ref.uid)
    if verdict is None or decided_on is not None:
        if counts is None:
            await _no_ledger_items(view)
            return False
        if not reconcile.ledger_agrees(decided_on or counts, counts):
            await _rebuild_from_ledger(services, view, counts)
            return False
        if verdict is None:
            threshold = float(view.spec.get("failureThreshold", 0.5))
            verdict = reconcile.verdict(counts.total, counts.failed, threshold)
    await services.jobs.ensure(view.ref.uid, view.ref.namespace, view.ref.name, view.pipeline, {})
    _, _, shown = await finish_job(
        services.jobs, services.kube, view.ref, view.generation, verdict, counts, services.settings.actor
    )
    await view.reload()
    return shown


async def _rebuild_from_ledger(services: Services, view: JobView, counts: ItemCounts) -> None:
    """Redis and the ledger disagree (e.g. the item source changed under a resumed dispatch):
    the ledger wins; the Redis copy is rebuilt from it, and the next tick decides on it."""
    log.warning(
        "job %s/%s: Redis shows nothing pending but the ledger has %d of %d items without an outcome "
        "and %d failed; rebuilding the Redis state from the ledger",
        view.ref.namespace,
        view.ref.name,
        counts.pending,
        counts.total,
        counts.failed,
    )
    await services.state.delete(view.ref.uid)
    await state.rebuild(services, view)


async def _no_ledger_items(view: JobView) -> None:
    """Redis shows nothing pending, but the ledger has no items: no exact counts to finish on and
    nothing to rebuild Redis from. Said once, as a condition and a warning; the loop backs off
    (`reconcile.is_quiet`) until Redis or the ledger changes."""
    message = (
        "Redis shows nothing pending but the results ledger has no items of this job: it cannot be "
        "finished on exact counts; waiting for the ledger"
    )
    if not view.has_condition("StateAvailable", "False", reason=LEDGER_MISSING):
        log.warning("job %s/%s (%s): %s", view.ref.namespace, view.ref.name, view.ref.uid, message)
    await view.set_conditions(("StateAvailable", "False", LEDGER_MISSING, message))
