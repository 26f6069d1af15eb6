"""In-memory fakes of the adapters `mljob.lifecycle.JobLoop` uses: one small, consistent world.

Why: the loop and its actions decide from what Redis, Postgres, NATS and the API server say; the
e2e tests need all four running and take minutes per scenario. These fakes keep the semantics
the loop relies on (first outcome per item wins, the jobs row's compare-and-set, the MLJob's
guarded patch and the server's status rules, work-queue streams that can vanish) so every
recovery path can be driven tick by tick in milliseconds. They are only for unit tests of
decision and loop logic; the adapters themselves are tested against real servers.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes.client.rest import ApiException
from nats.errors import NoRespondersError
from nats.js.api import (
    ConsumerConfig,
    ConsumerInfo,
    PubAck,
    SequenceInfo,
    StreamConfig,
    StreamInfo,
    StreamState,
)
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from mljob import ledger, protocol
from mljob.adapters.jobs_store import FinishOutcome, JobRow
from mljob.adapters.kube import GuardFailed, JobRef
from mljob.adapters.redis_state import RecordOutcome, RecordStatus, StoredJob
from mljob.adapters.results_store import UpsertResult
from mljob.api.models import GROUP, KIND, TERMINAL_PHASES, VERSION, Phase
from mljob.core.counts import ItemCounts
from mljob.core.phases import finalizable_from
from mljob.services import Services
from mljob.settings import OperatorSettings

_real_time = time.time


class Clock:
    """Wall-clock time plus an offset the test moves forward.

    The code under test also stamps times with `datetime.now` (startTime, completionTime), so the
    fake clock stays in step with the real one and only ever runs ahead of it.
    """

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return _real_time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


# --- Redis: per-job item state -------------------------------------------------------------


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


# --- Postgres: the results ledger and the jobs table ---------------------------------------


class FakeResultsStore:
    """`ResultsStore`: registered items per job, one row per (job, item), the first outcome wins."""

    def __init__(self) -> None:
        self.items: dict[str, list[str]] = {}
        self.rows: dict[tuple[str, str], protocol.Result] = {}
        self.dead: list[tuple[str, str, bytes, str]] = []

    def rows_of(self, uid: str) -> dict[str, protocol.Result]:
        return {item: row for (job, item), row in self.rows.items() if job == uid}

    async def register_items(self, uid: str, item_ids: Sequence[str]) -> None:
        known = self.items.setdefault(uid, [])
        seen = set(known)
        for item_id in item_ids:
            if item_id not in seen:
                known.append(item_id)
                seen.add(item_id)

    async def registered_count(self, uid: str) -> int:
        return len(self.items.get(uid, []))

    async def unresolved_items(self, uid: str) -> list[str]:
        return sorted(i for i in self.items.get(uid, []) if (uid, i) not in self.rows)

    async def upsert(self, results: Sequence[protocol.Result]) -> UpsertResult:
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

    async def progress(self, uid: str, phase: Phase, counts: ItemCounts, dispatched: int) -> None:
        record = self.records.get(uid)
        if record is None or record.phase not in _NON_TERMINAL:
            return
        record.phase = phase
        record.total, record.dispatched = counts.total, dispatched
        record.processed, record.failed = counts.processed, counts.failed

    async def set_phase(
        self, uid: str, phase: Phase, actor: str, reason: str = "", message: str = ""
    ) -> None:
        record = self.records.get(uid)
        if record is None or record.phase not in _NON_TERMINAL or record.phase == phase:
            return
        self.audit.append(Transition(uid, record.phase.value, phase.value, reason, actor))
        record.phase = phase

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


# --- Kubernetes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedEvent:
    uid: str
    reason: str
    message: str
    type: str


@dataclass(frozen=True)
class StatusWrite:
    """One accepted status write: the generation at that moment and the status before/after."""

    uid: str
    generation: int
    before: dict[str, Any]
    after: dict[str, Any]


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch (what `patch_status` sends)."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def server_rule_violation(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The CRD's CEL rules on status (see `MLJobStatus`): what the API server would refuse."""
    old_phase, new_phase = old.get("phase"), new.get("phase")
    if old_phase is not None:
        if new_phase is None:
            return "status.phase cannot be removed"
        if old_phase in TERMINAL_PHASES and new_phase != old_phase:
            return f"status.phase: a terminal phase ({old_phase}) never changes (to {new_phase})"
        if old_phase == Phase.CANCELING and new_phase not in (Phase.CANCELING, Phase.CANCELLED):
            return f"status.phase: Canceling can only become Cancelled (not {new_phase})"
    for key in ("processed", "failed"):
        if key in old and (key not in new or int(new[key]) < int(old[key])):
            return f"status.{key} never decreases ({old[key]} -> {new.get(key)})"
    if "completionTime" in old and new.get("completionTime") != old["completionTime"]:
        return "status.completionTime never changes once set"
    return None


class FakeKube:
    """`Kube` holding MLJobs, ConfigMaps, Events and deletions.

    The stored MLJob dict is the very object handed to `JobLoop` as kopf's live body: status
    writes and spec edits land in it at once (a watch with no lag).
    """

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.configmaps: dict[tuple[str, str], dict[str, str]] = {}
        self.events: list[RecordedEvent] = []
        self.deleted: list[JobRef] = []
        self.writes: list[StatusWrite] = []

    def create_job(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"namespace": namespace, "name": name, "uid": str(uuid.uuid4()), "generation": 1},
            "spec": copy.deepcopy(spec),
        }
        self.jobs[(namespace, name)] = body
        return body

    def edit_spec(self, body: Mapping[str, Any], **changes: Any) -> None:
        """`kubectl patch` of the spec: the generation moves, as on a real API server."""
        live = self.jobs[(body["metadata"]["namespace"], body["metadata"]["name"])]
        live["spec"].update(changes)
        live["metadata"]["generation"] += 1

    def events_of(self, uid: str, reason: str | None = None) -> list[RecordedEvent]:
        return [e for e in self.events if e.uid == uid and (reason is None or e.reason == reason)]

    def phases_of(self, uid: str) -> list[str]:
        """Every phase the MLJob's status showed, in order (repeats collapsed)."""
        shown: list[str] = []
        for write in self.writes:
            phase = write.after.get("phase")
            if write.uid == uid and phase is not None and (not shown or shown[-1] != phase):
                shown.append(phase)
        return shown

    def _live(self, job: JobRef) -> dict[str, Any]:
        body = self.jobs.get((job.namespace, job.name))
        if body is None:
            raise ApiException(status=404, reason="Not Found")
        return body

    def _commit(self, body: dict[str, Any], new: dict[str, Any]) -> None:
        old = body.get("status") or {}
        violation = server_rule_violation(old, new)
        if violation is not None:
            raise ApiException(status=422, reason=violation)
        meta = body["metadata"]
        self.writes.append(
            StatusWrite(meta["uid"], meta["generation"], copy.deepcopy(old), copy.deepcopy(new))
        )
        body["status"] = new

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.jobs.get((namespace, name))
        return copy.deepcopy(body) if body is not None else None

    async def list_jobs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(b) for (ns, _), b in self.jobs.items() if namespaces is None or ns in namespaces
        ]

    async def patch_status(self, job: JobRef, fields: dict[str, Any]) -> None:
        body = self._live(job)
        self._commit(body, _merge(body.get("status") or {}, fields))

    async def guarded_status(self, job: JobRef, expected_phase: str | None, fields: dict[str, Any]) -> None:
        """The JSON patch's `test` ops (uid, phase) and the server's rules both raise GuardFailed."""
        body = self._live(job)
        if body["metadata"]["uid"] != job.uid:
            raise GuardFailed("uid changed")
        current = body.get("status") or {}
        if expected_phase is None:
            new: dict[str, Any] = {}  # `add /status {}` replaces the whole status
        elif current.get("phase") != expected_phase:
            raise GuardFailed(f"phase is {current.get('phase')}, not {expected_phase}")
        else:
            new = copy.deepcopy(current)
        new.update(copy.deepcopy(fields))
        try:
            self._commit(body, new)
        except ApiException as err:
            raise GuardFailed(str(err.reason)) from err

    async def delete_job(self, job: JobRef) -> None:
        body = self.jobs.get((job.namespace, job.name))
        if body is None or body["metadata"]["uid"] != job.uid:
            return
        del self.jobs[(job.namespace, job.name)]
        self.deleted.append(job)

    async def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        data = self.configmaps.get((namespace, name))
        return dict(data) if data is not None else None

    async def event(self, job: JobRef, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(RecordedEvent(job.uid, reason, message, "Warning" if warning else "Normal"))


# --- NATS JetStream and the job registry ----------------------------------------------------


@dataclass
class FakeMessage:
    seq: int
    subject: str
    data: bytes


@dataclass
class _Consumer:
    config: ConsumerConfig
    created: datetime
    deliveries: dict[int, int] = field(default_factory=dict)  # seq -> times delivered
    last_active: float | None = None


@dataclass
class _Stream:
    config: StreamConfig
    created: datetime
    messages: dict[int, FakeMessage] = field(default_factory=dict)
    last_seq: int = 0
    msg_ids: set[str] = field(default_factory=set)  # the duplicate window, never expiring here
    consumers: dict[str, _Consumer] = field(default_factory=dict)


def subject_matches(pattern: str, subject: str) -> bool:
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def _not_found(what: str) -> NotFoundError:
    return NotFoundError(code=404, description=f"{what} not found", err_code=10059)


class FakeJetStream:
    """The `JetStreamContext` calls the operator makes, over work-queue streams kept in dicts.

    Workers are simulated with `fetch` (a delivery, counted by the consumer) and `ack` (the
    message leaves the work-queue stream).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.streams: dict[str, _Stream] = {}
        self.publishes = 0
        #: Called with the number of publish calls so far, before one is served: a test's way to
        #: break NATS at a chosen moment (raise, or delete the stream).
        self.before_publish: Callable[[int], None] | None = None

    def _stream(self, name: str) -> _Stream:
        stream = self.streams.get(name)
        if stream is None:
            raise _not_found(f"stream {name}")
        return stream

    def _info(self, stream: _Stream) -> StreamInfo:
        seqs = sorted(stream.messages)
        state = StreamState(
            messages=len(seqs),
            bytes=sum(len(m.data) for m in stream.messages.values()),
            first_seq=seqs[0] if seqs else stream.last_seq + 1,
            last_seq=stream.last_seq,
            consumer_count=len(stream.consumers),
        )
        return StreamInfo(config=stream.config, state=state, created=stream.created)

    async def stream_info(self, name: str, subjects_filter: str | None = None) -> StreamInfo:
        return self._info(self._stream(name))

    async def add_stream(self, config: StreamConfig | None = None, **params: Any) -> StreamInfo:
        assert config is not None and config.name
        stream = self.streams.get(config.name)
        if stream is None:
            stream = self.streams[config.name] = _Stream(config, datetime.now(UTC))
        return self._info(stream)

    async def delete_stream(self, name: str) -> bool:
        self._stream(name)
        del self.streams[name]
        return True

    async def add_consumer(
        self, stream: str, config: ConsumerConfig | None = None, timeout: float | None = None, **params: Any
    ) -> ConsumerInfo:
        assert config is not None and config.durable_name
        found = self._stream(stream)
        consumer = found.consumers.get(config.durable_name)
        if consumer is None:
            consumer = found.consumers[config.durable_name] = _Consumer(config, datetime.now(UTC))
        else:
            consumer.config = config
        return self._consumer_info(stream, config.durable_name)

    async def delete_consumer(self, stream: str, consumer: str) -> bool:
        found = self._stream(stream)
        if found.consumers.pop(consumer, None) is None:
            raise _not_found(f"consumer {consumer}")
        return True

    def _consumer_info(self, stream: str, name: str) -> ConsumerInfo:
        found = self._stream(stream)
        consumer = found.consumers.get(name)
        if consumer is None:
            raise NotFoundError(code=404, description=f"consumer {name} not found", err_code=10014)
        live = [seq for seq in found.messages if seq in consumer.deliveries]
        last = consumer.last_active
        return ConsumerInfo(
            name=name,
            stream_name=stream,
            config=consumer.config,
            created=consumer.created,
            delivered=SequenceInfo(
                consumer_seq=sum(consumer.deliveries.values()),
                stream_seq=max(consumer.deliveries, default=0),
                last_active=datetime.fromtimestamp(last, UTC) if last is not None else None,
            ),
            num_ack_pending=len(live),
            num_redelivered=sum(1 for seq in live if consumer.deliveries[seq] > 1),
            num_pending=sum(1 for seq in found.messages if seq not in consumer.deliveries),
            num_waiting=0,
        )

    async def consumer_info(self, stream: str, consumer: str, timeout: float | None = None) -> ConsumerInfo:
        return self._consumer_info(stream, consumer)

    async def publish_async(
        self,
        subject: str,
        payload: bytes = b"",
        wait_stall: float | None = None,
        stream: str | None = None,
        headers: dict[str, str] | None = None,
        msg_ttl: float | None = None,
    ) -> asyncio.Future[PubAck]:
        self.publishes += 1
        if self.before_publish is not None:
            self.before_publish(self.publishes)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        target = next(
            (
                s
                for s in self.streams.values()
                if any(subject_matches(p, subject) for p in s.config.subjects or [])
            ),
            None,
        )
        if target is None:
            future.set_exception(NoRespondersError())
            return future
        msg_id = (headers or {}).get(protocol.MSG_ID_HEADER)
        name = str(target.config.name)
        if msg_id is not None and msg_id in target.msg_ids:
            future.set_result(PubAck(stream=name, seq=target.last_seq, duplicate=True))
            return future
        if msg_id is not None:
            target.msg_ids.add(msg_id)
        target.last_seq += 1
        target.messages[target.last_seq] = FakeMessage(target.last_seq, subject, payload)
        future.set_result(PubAck(stream=name, seq=target.last_seq))
        return future

    # -- test-side helpers (a worker's view) --

    def fetch(self, stream: str, consumer: str, batch: int) -> list[FakeMessage]:
        """Deliver up to `batch` messages never delivered before, oldest first."""
        found = self._stream(stream)
        state = found.consumers[consumer]
        fresh = [m for seq, m in sorted(found.messages.items()) if seq not in state.deliveries][:batch]
        for message in fresh:
            state.deliveries[message.seq] = 1
        if fresh:
            state.last_active = self.clock.time()
        return fresh

    def ack(self, stream: str, seq: int) -> None:
        found = self.streams.get(stream)
        if found is not None:
            found.messages.pop(seq, None)

    def task_ids(self, stream: str) -> list[str]:
        """The item ids of the tasks a stream holds (delivered or not)."""
        found = self.streams.get(stream)
        if found is None:
            return []
        return [protocol.decode_task(m.data).item_id for _, m in sorted(found.messages.items())]


class FakeKeyValue:
    """The job registry bucket: put, get, purge, keys."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.revision = 0

    async def put(self, key: str, value: bytes, validate_keys: bool = True) -> int:
        self.revision += 1
        self.entries[key] = value
        return self.revision

    async def get(self, key: str, revision: int | None = None, validate_keys: bool = True) -> KeyValue.Entry:
        if key not in self.entries:
            raise KeyNotFoundError()
        return KeyValue.Entry("mljob-registry", key, self.entries[key], self.revision, None, None, None)

    async def purge(self, key: str, msg_ttl: float | None = None) -> bool:
        self.entries.pop(key, None)
        return True

    async def delete(self, key: str, last: int | None = None, validate_keys: bool = True) -> bool:
        self.entries.pop(key, None)
        return True

    async def keys(self, filters: list[str] | None = None, **kwargs: Any) -> list[str]:
        if not self.entries:
            raise NoKeysError()
        return sorted(self.entries)


# --- the world ----------------------------------------------------------------------------


@dataclass
class Pulled:
    """A task a simulated worker holds: the stream it came from and its sequence there."""

    stream: str
    seq: int
    task: protocol.Task


class FakeWorld:
    """All fakes together, the `Services` over them, and simulated workers."""

    def __init__(self, clock: Clock, settings: OperatorSettings) -> None:
        self.clock = clock
        self.kube = FakeKube()
        self.jobs = FakeJobsStore()
        self.results = FakeResultsStore()
        self.state = FakeJobState()
        self.js = FakeJetStream(clock)
        self.registry = FakeKeyValue()
        unused = cast(Any, None)  # the loop never touches raw connections
        self.services = Services(
            settings=settings,
            nc=unused,
            js=cast(Any, self.js),
            registry=cast(Any, self.registry),
            redis=unused,
            state=cast(Any, self.state),
            pool=unused,
            jobs=cast(Any, self.jobs),
            results=cast(Any, self.results),
            kube=cast(Any, self.kube),
        )

    def pull(self, uid: str, count: int) -> list[Pulled]:
        """A worker takes up to `count` undelivered tasks of the job (and may never answer)."""
        stream = protocol.task_stream(uid)
        if stream not in self.js.streams:
            return []
        messages = self.js.fetch(stream, protocol.task_consumer(uid), count)
        return [Pulled(stream, m.seq, protocol.decode_task(m.data)) for m in messages]

    async def answer(self, pulled: Sequence[Pulled], failed: frozenset[str] = frozenset()) -> None:
        """What the collector does with workers' results: the real `ledger.record`, then the ack."""
        results = [
            protocol.Result(
                job_uid=p.task.job.uid,
                item_id=p.task.item_id,
                outcome=protocol.Outcome.FAILED if p.task.item_id in failed else protocol.Outcome.SUCCEEDED,
                error="worker error" if p.task.item_id in failed else None,
                worker="fake-worker",
            )
            for p in pulled
        ]
        await ledger.record(cast(Any, self.results), cast(Any, self.state), results)
        for p in pulled:
            self.js.ack(p.stream, p.seq)

    async def work(self, uid: str, count: int, failed: frozenset[str] = frozenset()) -> list[str]:
        """Pull and answer up to `count` tasks; returns the item ids processed."""
        pulled = self.pull(uid, count)
        await self.answer(pulled, failed)
        return [p.task.item_id for p in pulled]
