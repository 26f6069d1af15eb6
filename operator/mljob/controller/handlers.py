"""kopf wiring: a few lines per handler, each delegating to the module that does the work."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from mljob.adapters.kube import JobRef
from mljob.adapters.services import Services, connect
from mljob.api.models import GROUP, PLURAL, VERSION
from mljob.controller import background
from mljob.controller.actions.cleanup import on_deleted
from mljob.controller.loop import JobLoop
from mljob.ops import health, logs, metrics
from mljob.transport import natsconn

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
    # kopf's advice for long watches: the server ends a watch after server_timeout, the client
    # gives up a little later (a stream the server forgot to end), connects fail fast, and
    # short API calls have their own bound instead of aiohttp's 5 minutes.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.connect_timeout = 30
    settings.networking.request_timeout = 60


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure_kopf(settings)
    try:
        services = await connect(memo.config)
    except natsconn.CannotStart as err:  # wrong credentials, a failed migration: kopf stops
        raise kopf.PermanentError(str(err)) from err
    memo.services = services
    memo.background = await background.start(services)
    memo.readiness.connected(health.store_checks(services.nc, services.redis, services.pool))
    log.info("mljob operator ready (collector %s)", "in-process" if memo.config.run_collector else "external")


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    await memo.background.stop()
    await memo.services.close()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def job_daemon(body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    services: Services = memo.services
    meta = body["metadata"]
    uid = meta["uid"]
    wake = services.wakeups.setdefault(uid, asyncio.Event())
    try:
        with logs.job_context(meta["namespace"], meta["name"], uid):
            await JobLoop(services, body).run(stopped, wake)
    finally:
        services.wakeups.pop(uid, None)
        metrics.JOBS.forget(uid)


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.ttlSecondsAfterFinished")
async def ttl_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A TTL set or changed after the job finished: the sleeping loop re-reads it."""
    memo.services.wake(body["metadata"]["uid"])


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def job_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body["metadata"]
    ref = JobRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
    try:
        with logs.job_context(ref.namespace, ref.name, ref.uid):
            await on_deleted(memo.services, ref, str(body.get("spec", {}).get("pipeline", "")))
    except Exception as err:
        raise kopf.TemporaryError(
            f"cleanup of {ref.namespace}/{ref.name} failed ({type(err).__name__}: {err}); retrying. "
            "To remove the MLJob without cleanup, see docs/operations.md 'Force-delete an MLJob'",
            delay=5,
        ) from err
