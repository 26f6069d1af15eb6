"""Recording outcomes: Postgres ledger first, then the Redis item state. One path for everyone.

The operator's recovery actions (deliveries exhausted, lost items, deadline, stream lost) record
failures they decide themselves through `record`; the collector follows the same two steps in
its batch loop (where it also dead-letters what the ledger refuses). Either way "the first
outcome of an item stands" holds against any mix of writers: the ledger's primary key
arbitrates, and Redis is told the outcome the ledger kept, never the writer's own guess. An item
is therefore never both processed and failed.

Only registered items are recorded (`ResultsStore.upsert` refuses the rest in the same
statement). The operator only fails items it dispatched, so a refusal here means the job's
items were never registered: it is logged and the refused results are left out of Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from mljob import protocol
from mljob.adapters.redis_state import JobState, RecordOutcome, RecordStatus
from mljob.adapters.results_store import ResultsStore, chunks

log = logging.getLogger(__name__)


async def record(
    store: ResultsStore, state: JobState, results: Sequence[protocol.Result]
) -> list[RecordOutcome]:
    """Store `results` (first outcome per item wins), then settle their items in Redis.

    Results the ledger refuses (not items of their job) are left out of the returned list.
    """
    if not results:
        return []
    upserted = await store.upsert(results)
    entries = []
    refused: list[str] = []
    for result in results:
        key = (result.job_uid, result.item_id)
        reason = upserted.refusal(key)
        if reason is not None:
            refused.append(reason)
            continue
        kept = upserted.stored.get(key, result.outcome)
        entries.append((result.job_uid, result.item_id, kept is protocol.Outcome.FAILED))
    if refused:
        log.warning("%d outcome(s) not recorded, e.g. %s", len(refused), refused[0])
    return await state.record(entries, time.time()) if entries else []


def failure(uid: str, item_id: str, reason: str, message: str, attempts: int = 1) -> protocol.Result:
    """A failed result the operator decided on, e.g. reason `MaxDeliveriesExceeded`."""
    return protocol.Result(
        job_uid=uid,
        item_id=item_id,
        outcome=protocol.Outcome.FAILED,
        error=f"{reason}: {message}",
        attempts=max(1, attempts),
        worker="mljob-operator",
    )


async def fail_items(
    store: ResultsStore,
    state: JobState,
    uid: str,
    item_ids: Sequence[str],
    reason: str,
    message: str,
    attempts: int = 1,
) -> int:
    """Fail items that have no outcome yet; returns how many were newly failed in Redis.

    Items that already have an outcome (a result landed first) keep it. One statement per chunk
    (as registration), so a million items is no single huge statement, and a failure partway
    keeps the chunks already recorded: the caller's retry does only what is left.
    """
    newly = 0
    for part in chunks(item_ids):
        outcomes = await record(store, state, [failure(uid, i, reason, message, attempts) for i in part])
        newly += sum(1 for o in outcomes if o.status is RecordStatus.NEW)
    return newly
