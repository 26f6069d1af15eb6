"""The FAIL_PENDING action: fail every item that has no outcome yet, then finish the job.

Used when the job has to end with work outstanding: items lost after a stall (row 5), the
deadline, a stream lost too often (row 11). Each failed item gets a result row whose error
names the reason, so every item of a finished job has exactly one outcome.
"""

from __future__ import annotations

import logging

from mljob import ledger
from mljob.adapters.services import Services
from mljob.controller.actions import finish
from mljob.controller.jobview import JobView
from mljob.core import reconcile
from mljob.ops import metrics

log = logging.getLogger(__name__)

#: Item ids named in a diagnostic, an Event or a condition; the rest are counted.
SHOWN_IDS = 10
#: Item ids per log line when all of them are logged.
LOGGED_IDS_PER_LINE = 200


def summarize_ids(ids: list[str], shown: int = SHOWN_IDS) -> str:
    """'a, b, c' or 'a, b, ... and 90 more' (pure; the full list goes to the ledger and the log)."""
    head = ", ".join(ids[:shown])
    return head if len(ids) <= shown else f"{head} and {len(ids) - shown} more"


async def fail_pending(services: Services, view: JobView, plan: reconcile.Plan) -> bool:
    """Fail what is unresolved with the plan's reason, then finish; True once terminal."""
    assert plan.fail_reason is not None
    uid = view.ref.uid
    reason = plan.fail_reason.value
    unresolved = await services.results.unresolved_items(uid)
    if unresolved:
        newly = await ledger.fail_items(
            services.results, services.state, uid, unresolved, reason, plan.message
        )
        metrics.items_failed_by_operator(reason, newly)
        summary = f"{plan.message}; failed {len(unresolved)} items: {summarize_ids(unresolved)}"
        log.warning(
            "job %s/%s (%s): %s (%d newly failed)", view.ref.namespace, view.ref.name, uid, summary, newly
        )
        for start in range(0, len(unresolved), LOGGED_IDS_PER_LINE):
            part = unresolved[start : start + LOGGED_IDS_PER_LINE]
            log.info("job %s: failed (%s): %s", uid, reason, " ".join(part))
        await view.write({"diagnostics": view.with_diagnostic(reason, summary)})
        await services.kube.event(view.ref, reason, summary, warning=True)
    return await finish.finish(services, view, plan.verdict)
