"""Fakes of the Redis job state, the Postgres results ledger and the jobs table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic_core import to_json

from mljob import protocol
from mljob.adapters.jobs_store import FinishOutcome, JobRow
from mljob.adapters.redis_state import RecordOutcome, RecordStatus, StoredJob
from mljob.adapters.results_store import RejectedResult, UpsertResult
from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.core.counts import ItemCounts
from mljob.core.items import fields_of, with_fields
from mljob.core.phases import finalizable_from, moves_to


@dataclass
class _ItemState:
    total: int
    pending: set[str]
    failed: set[str]
    activity: float | None = None


class FakeJobState:
    """`JobState` over dicts: `total` present means the state exists (absent: lost or never made)."""

    def __init__(self) -> None:
        self.jobs: dict[str, _ItemState] = {}

    def flush(self) -> None:
        """FLUSHALL: every job's state is gone."""
        self.jobs.clear()

    async def initialize(self, uid: str, item_ids: Sequence[str], chunk: int = 5000) -> bool:
        if uid in self.jobs:
            return False
        ids = set(item_ids)
        self.jobs[uid] = _ItemState(total=len(ids), pending=ids, failed=set())
        return True

    async def restore(
        self, uid: str, total: int, pending_ids: Sequence[str], failed_ids: Sequence[str], now: float
    ) -> bool:
        if uid in self.jobs:
            return False
        self.jobs[uid] = _ItemState(total, set(pending_ids), set(failed_ids), now)
        return True

    async def counts(self, uid: str) -> ItemCounts | None:
        job = self.jobs.get(uid)
        if job is None:
            return None
        return ItemCounts(job.total, len(job.pending), len(job.failed), job.activity)

    async def counts_many(self, uids: Sequence[str]) -> dict[str, ItemCounts | None]:
        return {uid: await FakeJobState.counts(self, uid) for uid in uids}

    async def record(self, entries: Sequence[tuple[str, str, bool]], now: float) -> list[RecordOutcome]:
        outcomes: list[RecordOutcome] = []
        for uid, item_id, failed in entries:
            job = self.jobs.get(uid)
            if job is None:
                outcomes.append(RecordOutcome(uid, item_id, RecordStatus.NO_STATE, None))
                continue
            if item_id in job.pending:
                job.pending.discard(item_id)
                if failed:
                    job.failed.add(item_id)
                if job.activity is None or now > job.activity:
                    job.activity = now
                status = RecordStatus.NEW
            else:
                status = RecordStatus.DUPLICATE
            outcomes.append(RecordOutcome(uid, item_id, status, len(job.pending)))
        return outcomes

    async def mark_failed(self, uid: str, item_ids: Sequence[str], now: float) -> int:
        outcomes = await self.record([(uid, item_id, True) for item_id in item_ids], now)
        return sum(1 for o in outcomes if o.status is RecordStatus.NEW)

    async def delete(self, uid: str) -> None:
        self.jobs.pop(uid, None)

    async def pending_ids(self, uid: str) -> set[str]:
        job = self.jobs.get(uid)
        return set(job.pending) if job else set()

    async def failed_ids(self, uid: str) -> set[str]:
        job = self.jobs.get(uid)
        return set(job.failed) if job else set()

    async def scan_jobs(self, count: int = 1000) -> dict[str, StoredJob]:
        return {uid: StoredJob(uid, (f"{uid}:total",), 0.0) for uid in self.jobs}


def _stored_fields(item: Mapping[str, Any]) -> dict[str, Any] | None:
    """An item's free fields as the ledger's json column gives them back: encoded as the task
    body encodes them (NaN and infinities as null), decoded again."""
    fields = fields_of(item)
    return None if fields is None else json.loads(to_json(fields, inf_nan_mode="null"))


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def _check_storable(result: protocol.Result) -> None:
    """What Postgres refuses (`RejectedResult`): NUL in text, and in jsonb a NUL (\\u0000) or a
    NaN or an infinity (not JSON at all)."""
    if any(_has_nul(text) for text in (result.job_uid, result.item_id, result.error, result.worker)):
        raise RejectedResult("rejected by Postgres: NUL in a text column")
    if result.result is not None:
        try:
            json.dumps(result.result, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise RejectedResult(f"result is not storable JSON: {err}") from err
        if _has_nul(result.result):
            raise RejectedResult("rejected by Postgres: \\u0000 cannot be stored in jsonb")


class FakeResultsStore:
    """`ResultsStore`: registered items per job, one row per (job, item), the first outcome wins."""

    def __init__(self) -> None:
        self.items: dict[str, list[str]] = {}
        #: (job uid, item id) -> the item's free fields as first registered (None: only an id)
        self.fields: dict[tuple[str, str], dict[str, Any] | None] = {}
        self.rows: dict[tuple[str, str], protocol.Result] = {}
        self.dead: list[tuple[str, str, bytes, str]] = []

    def rows_of(self, uid: str) -> dict[str, protocol.Result]:
        return {item: row for (job, item), row in self.rows.items() if job == uid}

    async def register_items(self, uid: str, items: Sequence[str] | Sequence[Mapping[str, Any]]) -> None:
        ids = [item if isinstance(item, str) else str(item["id"]) for item in items]
        if any("\x00" in item_id for item_id in ids):  # Postgres text cannot hold NUL: nothing is kept
            raise ValueError(f"item ids of job {uid} are not storable: NUL in an id")
        known = self.items.setdefault(uid, [])
        seen = set(known)
        for item, item_id in zip(items, ids, strict=True):
            if item_id not in seen:
                known.append(item_id)
                seen.add(item_id)
                self.fields[(uid, item_id)] = None if isinstance(item, str) else _stored_fields(item)

    async def registered_count(self, uid: str) -> int:
        return len(self.items.get(uid, []))

    async def unresolved_items(self, uid: str) -> list[str]:
        return sorted(i for i in self.items.get(uid, []) if (uid, i) not in self.rows)

    async def unresolved_item_records(self, uid: str) -> list[dict[str, Any]]:
        return [with_fields(i, self.fields.get((uid, i))) for i in await self.unresolved_items(uid)]

    async def upsert(self, results: Sequence[protocol.Result]) -> UpsertResult:
        for result in results:  # the whole batch is refused, as the one statement is
            _check_storable(result)
        out = UpsertResult()
        for result in results:
            key = (result.job_uid, result.item_id)
            registered = self.items.get(result.job_uid)
            if not registered:
                out.unknown_job.add(key)
            elif result.item_id not in registered:
                out.not_an_item.add(key)
            else:
                kept = self.rows.setdefault(key, result)
                out.stored[key] = kept.outcome
        return out

    async def item_outcomes(self, uid: str) -> dict[str, str]:
        return {item: row.outcome.value for item, row in self.rows_of(uid).items()}

    async def count(self, uid: str) -> tuple[int, int]:
        rows = self.rows_of(uid).values()
        return len(rows), sum(1 for r in rows if r.outcome is protocol.Outcome.FAILED)

    async def dead_letters(self, source: str, letters: Sequence[tuple[str, bytes, str]]) -> None:
        self.dead.extend((source, subject, payload, reason) for subject, payload, reason in letters)

    async def dead_letter(self, source: str, subject: str, payload: bytes, reason: str) -> None:
        self.dead.append((source, subject, payload, reason))


@dataclass
class _JobRecord:
    uid: str
    namespace: str
    name: str
    pipeline: str
    phase: Phase
    reason: str | None = None
    message: str | None = None
    total: int = 0
    processed: int = 0
    failed: int = 0
    dispatched: int = 0
    completion_time: datetime | None = None

    def row(self) -> JobRow:
        return JobRow(
            self.uid,
            self.phase,
            self.reason,
            self.message,
            self.total,
            self.processed,
            self.failed,
            self.completion_time,
        )


@dataclass(frozen=True)
class Transition:
    """One audit row of `mljob_transitions`."""

    uid: str
    from_phase: str | None
    to_phase: str
    reason: str
    actor: str


_NON_TERMINAL = frozenset(p for p in Phase if p not in TERMINAL_PHASES)


class FakeJobsStore:
    """`JobsStore` with its compare-and-set semantics, the SQL's WHERE clauses as `if`s."""

    def __init__(self) -> None:
        self.records: dict[str, _JobRecord] = {}
        self.audit: list[Transition] = []

    async def ensure(self, uid: str, namespace: str, name: str, pipeline: str, spec: dict[str, Any]) -> None:
        self.records.setdefault(uid, _JobRecord(uid, namespace, name, pipeline, Phase.PENDING))

    async def get(self, uid: str) -> JobRow | None:
        record = self.records.get(uid)
        return record.row() if record else None

    async def progress(self, uid: str, phase: Phase, counts: ItemCounts, dispatched: int, actor: str) -> None:
        record = self.records.get(uid)
        if record is None or record.phase not in _NON_TERMINAL:
            return
        if moves_to(record.phase, phase):
            self.audit.append(Transition(uid, record.phase.value, phase.value, "", actor))
            record.phase = phase
        record.total, record.dispatched = counts.total, dispatched
        record.processed, record.failed = counts.processed, counts.failed

    async def set_phase(
        self,
        uid: str,
        phase: Phase,
        actor: str,
        reason: str = "",
        message: str = "",
        dispatched: int | None = None,
    ) -> None:
        if phase in TERMINAL_PHASES:
            raise ValueError(f"{phase} is terminal: only finish() writes it")
        record = self.records.get(uid)
        if record is None or not moves_to(record.phase, phase):
            return
        self.audit.append(Transition(uid, record.phase.value, phase.value, reason, actor))
        record.phase = phase
        if dispatched is not None:
            record.dispatched = dispatched

    async def finish(
        self, uid: str, target: Phase, reason: str, message: str, counts: ItemCounts | None, actor: str
    ) -> FinishOutcome:
        record = self.records.get(uid)
        if record is None:
            raise LookupError(f"job {uid} has no Postgres row")
        if record.phase not in finalizable_from(target):
            return FinishOutcome(False, record.row())
        self.audit.append(Transition(uid, record.phase.value, target.value, reason, actor))
        record.phase, record.reason, record.message = target, reason, message
        record.completion_time = datetime.now(UTC)
        if counts is not None:
            record.total, record.processed, record.failed = counts.total, counts.processed, counts.failed
        return FinishOutcome(True, record.row())

    async def namespaces(self, uids: Sequence[str]) -> dict[str, str]:
        return {uid: self.records[uid].namespace for uid in uids if uid in self.records}
