"""The orphan sweep: remove job consumers (and their tasks), registry entries and Redis keys no
live MLJob owns.

Failure-modes row 13: cleanup runs on completion and in the finalizer, but any path that
skips it (a crash between verdict and cleanup, a finalizer removed by hand, a job deleted
while the operator was down with its finalizer stripped) leaks. This periodic collector is
the backstop. The decision is mljob.core.orphans; this module observes, decides, deletes.

Order matters and is fixed here: observe the resources first, then LIST the MLJobs, so a job
created meanwhile is in the listing or has no observed resource. A failed LIST skips the sweep:
a partial listing would make every job of the missing namespace look like an orphan.

Age of Redis keys: the smallest ``OBJECT IDLETIME`` of the job's keys, i.e. how long nobody
touched any of them; a job still being written is never "old". Redis with an LFU eviction
policy cannot report it: the age is then unknown and only a zero grace period removes them
(the observe-then-list order alone already protects every live job).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.redis_state import StoredJob
from mljob.adapters.services import Services
from mljob.core.orphans import Kind, Resource, decide, is_job_uid, live_uids
from mljob.ops import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """What the stores hold, before the MLJob listing; ``redis_keys`` lists each job's keys."""

    resources: list[Resource]
    redis_keys: dict[str, tuple[str, ...]]


@dataclass
class SweepReport:
    removed: list[Resource] = field(default_factory=list)
    failed: list[tuple[Resource, str]] = field(default_factory=list)
    observed: int = 0
    #: Why nothing was decided (a failed observation or MLJob listing); None when the sweep ran.
    skipped: str | None = None


def watched_namespaces(services: Services) -> list[str] | None:
    """The operator's namespaces; None when it runs cluster-wide."""
    return list(services.settings.namespaces) or None


def _age(created: datetime | None, now: datetime) -> float | None:
    if created is None:
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return (now - created).total_seconds()


async def observe(services: Services) -> Observation:
    """Every job consumer, registry entry and Redis key set, with its age and owner namespace."""
    now = datetime.now(UTC)
    consumers = await jetstream.list_job_consumers(services.js)
    registry = await jetstream.list_registry(services.js, services.registry)
    scanned = await services.state.scan_jobs(idle=False)  # aged in find_orphans, where it matters
    stored = {uid: job for uid, job in scanned.items() if is_job_uid(uid)}
    unowned_entries = {r.uid for r in registry if r.entry is None or not r.entry.namespace}
    wanted = {c.uid for c in consumers} | set(stored) | unowned_entries
    owners = await services.jobs.namespaces(sorted(u for u in wanted if is_job_uid(u)))
    resources = [
        Resource(Kind.TASKS, c.uid, c.name, _age(c.created, now), owners.get(c.uid)) for c in consumers
    ]
    for r in registry:
        owner = r.entry.namespace if r.entry is not None and r.entry.namespace else owners.get(r.uid)
        created = r.entry.created if r.entry is not None else None
        resources.append(Resource(Kind.REGISTRY, r.uid, r.key, _age(created, now), owner))
    prefix = services.settings.redis_prefix
    for uid, job in sorted(stored.items()):
        name = f"{prefix}:{{{uid}}}:*"
        resources.append(Resource(Kind.REDIS, uid, name, job.idle_seconds, owners.get(uid)))
    return Observation(resources, {uid: job.keys for uid, job in stored.items()})


async def find_orphans(services: Services) -> tuple[Observation, list[Resource]]:
    """Observe, then list the MLJobs, then decide. Raises when any of it fails."""
    seen = await observe(services)
    namespaces = watched_namespaces(services)
    jobs = await services.kube.list_jobs(namespaces)  # strictly after the observation
    live = live_uids(jobs)
    seen = await _age_redis_keys(services, seen, live)
    orphans = decide(seen.resources, live, namespaces, services.settings.orphan_grace_seconds)
    return seen, orphans


async def _age_redis_keys(services: Services, seen: Observation, live: set[str]) -> Observation:
    """The age of each job's Redis keys that no live MLJob owns (a live job's keys are never
    orphans, so their age is not asked for: that was one OBJECT IDLETIME per key per sweep)."""
    unowned = {
        r.uid: StoredJob(uid=r.uid, keys=seen.redis_keys[r.uid], idle_seconds=None)
        for r in seen.resources
        if r.kind is Kind.REDIS and r.uid not in live
    }
    aged = await services.state.measure_idle(unowned) if unowned else {}
    resources = [
        replace(r, age=aged[r.uid].idle_seconds) if r.kind is Kind.REDIS and r.uid in aged else r
        for r in seen.resources
    ]
    return Observation(resources, seen.redis_keys)


async def delete(services: Services, orphan: Resource, redis_keys: Sequence[str] = ()) -> None:
    """Remove one orphan with the same calls the per-job cleanup uses (all idempotent)."""
    if orphan.kind is Kind.TASKS:  # named `<stream>/<consumer>`: the job's tasks and consumer
        stream, _, consumer = orphan.name.partition("/")
        pipeline = stream.removeprefix(protocol.TASK_STREAM_PREFIX)
        parsed = protocol.parse_task_consumer(consumer)
        generation = parsed[1] if parsed is not None else 0
        await jetstream.delete_job_tasks(services.js, pipeline, orphan.uid, generation)
    elif orphan.kind is Kind.REGISTRY:
        pipeline = orphan.name.rpartition(".")[0]
        await jetstream.unregister_job(services.registry, pipeline, orphan.uid)
    else:
        await services.state.delete(orphan.uid)
        extra = set(redis_keys) - set(services.state.keys(orphan.uid).all())
        if extra:  # keys JobState.delete does not know (yet): still the job's, still orphaned
            await services.redis.delete(*sorted(extra))


def describe(resource: Resource) -> str:
    """One line for the log and `mljob chaos list-orphans`."""
    age = "unknown" if resource.age is None else f"{resource.age:.0f}s"
    owner = resource.owner or "unknown"
    return f"{resource.kind} {resource.name} (owner {owner}, age {age})"  # the name carries the UID


async def sweep_orphans(services: Services) -> SweepReport:
    """One sweep: logs each removed resource and one summary line; never raises for a store error."""
    report = SweepReport()
    try:
        seen, orphans = await find_orphans(services)
    except Exception as err:
        report.skipped = f"{type(err).__name__}: {err}"
        log.warning("orphan sweep skipped: no complete view of the stores and MLJobs (%s)", report.skipped)
        return report
    report.observed = len(seen.resources)
    for orphan in orphans:
        try:
            await delete(services, orphan, seen.redis_keys.get(orphan.uid, ()))
        except Exception as err:
            report.failed.append((orphan, f"{type(err).__name__}: {err}"))
            log.warning("orphan sweep: could not remove %s: %s", describe(orphan), err)
            continue
        report.removed.append(orphan)
        metrics.ORPHANS_REMOVED.labels(kind=orphan.kind.value).inc()
        log.info("orphan sweep: removed %s", describe(orphan))
    counts = {kind: sum(1 for r in report.removed if r.kind is kind) for kind in Kind}
    log.log(
        logging.INFO if orphans else logging.DEBUG,
        "orphan sweep: removed %d orphan(s) (%d job consumers, %d registry entries, %d Redis key sets), "
        "%d failed, %d resources observed",
        len(report.removed),
        counts[Kind.TASKS],
        counts[Kind.REGISTRY],
        counts[Kind.REDIS],
        len(report.failed),
        report.observed,
    )
    return report


async def run_sweeper(services: Services, stop: asyncio.Event) -> None:
    """Sweep every `orphan_sweep_interval` seconds until `stop` is set; the first sweep waits one
    interval, so a starting operator never sweeps before it is fully up. Interval <= 0 disables it."""
    interval = services.settings.orphan_sweep_interval
    if interval <= 0:
        log.info("orphan sweep disabled (interval %s)", interval)
        return
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        except TimeoutError:
            pass
        try:
            await sweep_orphans(services)
        except Exception:  # a bug must not end the sweeper for the life of the operator
            log.exception("orphan sweep failed")
