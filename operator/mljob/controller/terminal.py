"""The guarded terminal transition, in both stores (failure-modes rows 6 and 7).

Postgres arbitrates with a compare-and-set; the MLJob status then mirrors what Postgres holds
through a JSON patch whose `test` op checks the phase that was read. A writer whose guard did
not fire mirrors the winner, never its own guess.
"""

from __future__ import annotations

import logging
from typing import Any

from mljob.adapters.jobs_store import JobRow, JobsStore
from mljob.adapters.kube import GuardFailed, JobRef, Kube
from mljob.adapters.services import Services
from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.controller.jobview import JobView, iso, now_iso
from mljob.core import reconcile
from mljob.core.conditions import set_condition
from mljob.core.counts import ItemCounts
from mljob.ops import metrics

log = logging.getLogger(__name__)


async def finish_job(
    jobs: JobsStore,
    kube: Kube,
    ref: JobRef,
    generation: int,
    verdict: reconcile.Verdict,
    counts: ItemCounts | None,
    actor: str,
) -> tuple[bool, JobRow, bool]:
    """Returns (whether this writer won, the row Postgres holds, whether the CR now shows a
    terminal phase). When the CR could not be written yet, the caller must try again."""
    outcome = await jobs.finish(ref.uid, verdict.phase, verdict.reason, verdict.message, counts, actor)
    row = outcome.row
    if not outcome.won:
        metrics.GUARD_REFUSALS.labels(store="postgres").inc()
        log.info("job %s/%s: Postgres already holds %s; mirroring it", ref.namespace, ref.name, row.phase)
        counts = row.counts
    shown = await mirror_phase(kube, ref, generation, row.phase, row.reason or "", row.message or "", counts)
    if outcome.won:
        # The one line a job's end always leaves in the operator's log (the Event expires).
        why = row.message or row.reason or ""
        log.info("job %s/%s %s: %s", ref.namespace, ref.name, row.phase.value, why)
        await kube.event(ref, row.phase.value, row.message or "", warning=row.phase is Phase.FAILED)
    return outcome.won, row, shown


def terminal_fields(
    current: dict[str, Any],
    generation: int,
    phase: Phase,
    reason: str,
    message: str,
    counts: ItemCounts | None,
) -> dict[str, Any]:
    """The status fields of a terminal transition (pure)."""
    now = now_iso()
    fields: dict[str, Any] = {"phase": phase.value, "completionTime": now, "observedGeneration": generation}
    if counts is not None:
        progress = reconcile.progress_fields(counts, int(current.get("dispatched", 0)))
        # counts never go down on the server; keep the larger of what is shown and what we know
        for key in ("processed", "failed"):
            progress[key] = max(int(current.get(key, 0) or 0), progress[key])
        fields.update(progress)
        if counts.last_activity is not None:
            fields["lastActivityTime"] = iso(counts.last_activity)
    conditions = current.get("conditions", [])
    updates = terminal_conditions(phase)
    if any(c.get("type") == "Stalled" and c.get("status") == "True" for c in conditions):
        updates.append(("Stalled", "False"))
    for type_, status in updates:
        conditions = set_condition(conditions, type_, status, reason, message, generation, now)
    fields["conditions"] = conditions
    return fields


def terminal_conditions(phase: Phase) -> list[tuple[str, str]]:
    """The Job API's convention: `Complete=True` only for Succeeded, `Failed=True` only for
    Failed; a Cancelled job has neither and its own `Cancelled=True`, so `kubectl wait
    --for=condition=Complete` never returns for it."""
    if phase is Phase.SUCCEEDED:
        return [("Complete", "True"), ("Progressing", "False")]
    if phase is Phase.FAILED:
        return [("Failed", "True"), ("Progressing", "False")]
    return [("Cancelled", "True"), ("Progressing", "False")]


async def mirror_phase(
    kube: Kube,
    ref: JobRef,
    generation: int,
    phase: Phase,
    reason: str,
    message: str,
    counts: ItemCounts | None,
    attempts: int = 5,
) -> bool:
    """Write `phase` to the MLJob unless it is already terminal; retried when the guard trips.
    True when the MLJob shows a terminal phase afterwards (or no longer exists)."""
    for _ in range(attempts):
        fresh = await kube.get_job(ref.namespace, ref.name)
        if fresh is None or fresh["metadata"]["uid"] != ref.uid:
            return True  # deleted (or re-created): nothing left to show the verdict on
        current = dict(fresh.get("status") or {})
        if current.get("phase") in TERMINAL_PHASES:
            return True  # absorbing: nothing to write
        fields = terminal_fields(current, generation, phase, reason, message, counts)
        try:
            await kube.guarded_status(ref, current.get("phase"), fields, fresh["metadata"]["resourceVersion"])
        except GuardFailed as err:
            metrics.GUARD_REFUSALS.labels(store="kubernetes").inc()
            log.info("status of %s/%s changed under us (%s); re-reading", ref.namespace, ref.name, err)
            continue
        return True
    return False


async def mirror_row(services: Services, view: JobView, row: JobRow) -> bool:
    """Show the verdict Postgres (the arbiter) already holds; True once the MLJob shows it."""
    return await mirror_phase(
        services.kube, view.ref, view.generation, row.phase, row.reason or "", row.message or "", row.counts
    )
