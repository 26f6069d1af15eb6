"""kopf wiring: a few lines per handler, each delegating to the module that does the work.

kopf only watches: one event handler feeds the scheduler's index (no daemon, no diff-base or
progress annotations, no finalizer of kopf's: the job loop manages its own).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from mljob.adapters.services import connect
from mljob.api.models import GROUP, PLURAL, VERSION
from mljob.controller import background
from mljob.controller.scheduler import Scheduler
from mljob.ops import health
from mljob.transport import natsconn

log = logging.getLogger(__name__)


def configure_kopf(settings: kopf.OperatorSettings) -> None:
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
    memo.scheduler = Scheduler(services, memo.config.reconcile_workers, getattr(memo, "leadership", None))
    memo.background = await background.start(services)
    memo.scheduler.start()
    memo.readiness.connected(health.store_checks(services.nc, services.redis, services.pool))
    log.info("mljob operator ready (collector %s)", "in-process" if memo.config.run_collector else "external")


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    await memo.scheduler.stop()
    await memo.background.stop()
    await memo.services.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every watch event of an MLJob: the scheduler keeps its slim copy and decides if it is due.

    Async on purpose: kopf runs a plain function in a thread of its executor, and the scheduler
    is not thread-safe. As a plain function this set the scheduler's asyncio.Event from that
    thread; once, during a burst of 10,000 new MLJobs, the feeder slept on an Event that was set
    and never woken, and 9,475 MLJobs waited forever with every worker idle."""
    memo.scheduler.observe(type, body)
