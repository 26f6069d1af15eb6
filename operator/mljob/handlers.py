"""kopf wiring: a few lines per handler, each delegating to the module that does the work."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from mljob import background
from mljob.actions.cleanup import on_deleted
from mljob.adapters.kube import JobRef
from mljob.api.models import GROUP, PLURAL, VERSION
from mljob.lifecycle import JobLoop
from mljob.services import Services, connect

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
    services = await connect(memo.config)
    memo.services = services
    memo.background = await background.start(services)
    log.info("mljob operator ready (collector %s)", "in-process" if memo.config.run_collector else "external")


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    await memo.background.stop()
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
