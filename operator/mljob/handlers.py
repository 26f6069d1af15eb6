"""kopf wiring: a few lines per handler, each delegating to the module that does the work."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from mljob import protocol
from mljob.actions.cleanup import on_deleted
from mljob.adapters.kube import JobRef
from mljob.api.models import GROUP, PLURAL, VERSION
from mljob.lifecycle import JobLoop
from mljob.services import Services, connect
from mljob.settings import OperatorSettings

log = logging.getLogger(__name__)
PREFIX = GROUP


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = f"{PREFIX}/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    # Inline items can be large: keep them out of the diff base kopf stores in an annotation.
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration", ignored_fields=["spec.items", "spec.params"]
    )
    settings.posting.enabled = False  # handler log lines are not Events; we post our own
    settings.watching.server_timeout = 300


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure_kopf(settings)
    config: OperatorSettings = memo.config
    services = await connect(config)
    memo.services = services

    async def on_drained(msg: Any) -> None:
        services.wake(msg.subject.rsplit(".", 1)[-1])

    # One wake-up path for in-process and external collectors alike: the drained event on NATS.

    await services.nc.subscribe(f"{protocol.DRAINED_SUBJECT_PREFIX}.*", cb=on_drained)

    async def on_heartbeat(msg: Any) -> None:
        services.heartbeats[msg.subject.rsplit(".", 1)[-1]] = time.time()

    # Workers busy on long tasks say so: such a job is not stalled (failure-modes row 5).
    await services.nc.subscribe(f"{protocol.HEARTBEAT_SUBJECT_PREFIX}.*", cb=on_heartbeat)
    memo.collector_stop = asyncio.Event()
    memo.collector_task = None
    if config.run_collector:
        from mljob.collector import Collector

        collector = Collector(services.js, services.nc, services.state, services.results)
        memo.collector_task = asyncio.create_task(collector.run(memo.collector_stop))
    # Items NATS gave up on (max deliveries) are failed within seconds, and their job woken.
    from mljob.adapters.jetstream import ensure_advisory_stream
    from mljob.exhausted import ExhaustedDeliveries
    from mljob.services import with_retry

    await with_retry(
        "the NATS advisory stream", lambda: ensure_advisory_stream(services.js, config.stream_replicas)
    )
    exhausted = ExhaustedDeliveries(services.js, services.nc, services.results, services.state, services.wake)
    memo.exhausted_task = asyncio.create_task(exhausted.run(memo.collector_stop))
    # Streams, registry entries and Redis keys that no live MLJob owns are swept (row 13).
    from mljob.sweep import run_sweeper

    memo.sweeper_task = asyncio.create_task(run_sweeper(services, memo.collector_stop))
    log.info("mljob operator ready (collector %s)", "in-process" if config.run_collector else "external")


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    memo.collector_stop.set()
    running = (memo.collector_task, memo.get("exhausted_task"), memo.get("sweeper_task"))
    tasks = [t for t in running if t is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    await memo.services.close()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def job_daemon(body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    services: Services = memo.services
    uid = body["metadata"]["uid"]
    wake = services.wakeups.setdefault(uid, asyncio.Event())
    try:
        await JobLoop(services, body).run(stopped, wake)
    finally:
        services.wakeups.pop(uid, None)


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.ttlSecondsAfterFinished")
async def ttl_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A TTL set or changed after the job finished: the sleeping loop re-reads it."""
    memo.services.wake(body["metadata"]["uid"])


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def job_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body["metadata"]
    ref = JobRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
    try:
        await on_deleted(memo.services, ref, str(body.get("spec", {}).get("pipeline", "")))
    except Exception as err:
        raise kopf.TemporaryError(
            f"cleanup of {ref.namespace}/{ref.name} failed ({type(err).__name__}: {err}); retrying. "
            "To remove the MLJob without cleanup, see docs/operations.md 'Force-delete an MLJob'",
            delay=5,
        ) from err
