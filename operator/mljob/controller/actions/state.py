"""Per-item Redis state: written before the first publish, rebuilt when lost (rows 9, 12).

The results ledger in Postgres knows every item of the job (`mljob_items`, written at dispatch)
and every outcome; Redis is a fast copy of "what is still pending". When the copy is gone
(FLUSHALL, failover, eviction) it is rebuilt from the ledger, and the job carries on with exact
counts. Missing state is never read as "complete".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from mljob.adapters.services import Services
from mljob.api.models import TERMINAL_PHASES
from mljob.controller import terminal
from mljob.controller.jobview import JobView

log = logging.getLogger(__name__)


async def ensure_state(services: Services, uid: str, item_ids: Sequence[str]) -> str:
    """Make sure the job's state exists; returns "present", "initialized" or "rebuilt"."""
    if await services.state.counts(uid) is not None:
        return "present"
    recorded, _ = await services.results.count(uid)
    if recorded == 0:
        await services.state.initialize(uid, item_ids)
        if (await services.results.count(uid))[0]:
            await _replay_ledger(services, uid)  # a result stored meanwhile found no state
        return "initialized"
    await rebuild_from_ledger(services, uid)
    return "rebuilt"


async def rebuild_from_ledger(services: Services, uid: str) -> tuple[int, int]:
    """Recreate the state from Postgres; returns (pending, failed) as rebuilt.

    A result the collector stores between our read of the ledger and the restore finds no state
    and creates none; so once the state exists, every recorded outcome is replayed into it
    (idempotent: an item leaves `pending` once), which closes that window.
    """
    total = await services.results.registered_count(uid)
    pending = await services.results.unresolved_items(uid)
    outcomes = await services.results.item_outcomes(uid)
    failed = [item for item, outcome in outcomes.items() if outcome == "failed"]
    await services.state.restore(uid, total, pending, failed, time.time())
    await _replay_ledger(services, uid)
    return len(pending), len(failed)


async def _replay_ledger(services: Services, uid: str) -> None:
    """Record every outcome of the ledger into the (existing) state: idempotent, an item leaves
    `pending` once. Closes the window in which a result was stored while the state was missing."""
    outcomes = await services.results.item_outcomes(uid)
    await services.state.record(
        [(uid, item, outcome == "failed") for item, outcome in outcomes.items()], time.time()
    )


async def rebuild(services: Services, view: JobView) -> bool:
    """The REBUILD_STATE action; True when the job turned out to be terminal in Postgres."""
    uid = view.ref.uid
    row = await services.jobs.get(uid)
    if row is not None and row.phase in TERMINAL_PHASES:
        # A crash between the two terminal writes: the MLJob mirrors the arbiter.
        return await terminal.mirror_row(services, view, row)
    if await services.results.registered_count(uid) == 0:
        await view.set_conditions(
            (
                "StateAvailable",
                "False",
                "StateMissing",
                "the job's per-item state is missing from Redis and the ledger has no items to rebuild "
                "it from; it is not treated as complete",
            )
        )
        return False
    pending, failed = await rebuild_from_ledger(services, uid)
    message = (
        "per-item state was missing from Redis; rebuilt from the results ledger: "
        f"{pending} pending, {failed} failed"
    )
    log.warning("job %s/%s (%s): %s", view.ref.namespace, view.ref.name, uid, message)
    await view.set_conditions(
        ("StateAvailable", "True", "StateRebuilt", message),
        extra={"diagnostics": view.with_diagnostic("StateRebuilt", message)},
    )
    await services.kube.event(view.ref, "StateRebuilt", message, warning=True)
    return False
