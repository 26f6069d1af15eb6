"""The CANCEL action: Canceling (guarded, both stores), clean up, then Cancelled.

Postgres arbitrates first: once its row is Canceling no other verdict can win (Canceling may
only become Cancelled), and if the job finished a moment earlier the MLJob mirrors that
verdict instead. Results that arrive afterwards are still recorded; the verdict stays.
"""

from __future__ import annotations

import logging

from mljob.adapters.kube import GuardFailed
from mljob.adapters.services import Services
from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.controller import terminal
from mljob.controller.actions import finish
from mljob.controller.actions.cleanup import cleanup_job
from mljob.controller.jobview import JobView
from mljob.core import reconcile
from mljob.ops import metrics

log = logging.getLogger(__name__)


async def cancel(services: Services, view: JobView, plan: reconcile.Plan) -> bool:
    """One step of cancelling to the plan's verdict; True once the MLJob shows a terminal phase."""
    assert plan.verdict is not None and plan.verdict.phase is Phase.CANCELLED
    verdict = plan.verdict
    uid = view.ref.uid
    if view.phase is not Phase.CANCELING:
        await services.jobs.ensure(uid, view.ref.namespace, view.ref.name, view.pipeline, {})
        await services.jobs.set_phase(
            uid, Phase.CANCELING, services.settings.actor, verdict.reason, verdict.message
        )
        row = await services.jobs.get(uid)
        if row is not None and row.phase in TERMINAL_PHASES:
            log.info(
                "job %s/%s finished as %s before the cancel landed",
                view.ref.namespace,
                view.ref.name,
                row.phase,
            )
            return await terminal.mirror_row(services, view, row)
        fields = {
            "phase": Phase.CANCELING.value,
            "observedGeneration": view.generation,
            "conditions": view.conditions_with(
                (
                    "Progressing",
                    "False",
                    "Canceling",
                    "spec.cancel was set: stopping dispatch and cleaning up",
                )
            ),
        }
        try:
            await services.kube.guarded_status(
                view.ref, view.status.get("phase"), fields, view.resource_version
            )
        except GuardFailed:
            metrics.GUARD_REFUSALS.labels(store="kubernetes").inc()
            await view.reload()  # someone else moved it; decide again next tick
            return False
        view.status.update(fields)
        await services.kube.event(
            view.ref, "Canceling", "spec.cancel was set: stopping dispatch and cleaning up"
        )
    await cleanup_job(services, uid, view.pipeline, view.consumer_generation)
    return await finish.finish(services, view, verdict)
