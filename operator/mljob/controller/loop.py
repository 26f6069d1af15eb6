"""The per-job reconcile loop: observe, decide (mljob.core.reconcile), act (mljob.controller.actions).

One loop runs per MLJob (a kopf daemon). An idle tick is one Redis round trip, plus one NATS
round trip when the job's counts did not move, and no write; a job that stays quiet is looked at
less and less often (`reconcile.next_tick`, up to `MLJOB_IDLE_RECONCILE_INTERVAL`). The
collector, the exhausted-deliveries watcher and workers' heartbeats wake or feed the loop, so
the terminal status lands within about a second of the last outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from mljob.adapters.services import Services
from mljob.api.models import TERMINAL_PHASES
from mljob.controller import observe
from mljob.controller.actions import cancel, cleanup, dispatch, fail_items, finish, redispatch, state
from mljob.controller.jobview import JobView, iso, parse_time
from mljob.core import reconcile
from mljob.core.counts import ItemCounts
from mljob.ops import metrics

log = logging.getLogger(__name__)

#: After an unexpected error the loop backs off up to this long (a traceback is logged once).
MAX_ERROR_BACKOFF_SECONDS = 60.0


class JobLoop:
    """Drives one MLJob from Pending to a terminal phase, cleans up, and deletes it after its TTL."""

    def __init__(self, services: Services, body: Mapping[str, Any]) -> None:
        self.s = services
        self.view = JobView(services.kube, body)
        self.watching_since = time.time()
        self.previous_counts: ItemCounts | None = None
        self.cleaned = False
        self.last_error: str | None = None
        #: consecutive ticks that found the running job as it was, and the latest snapshot
        self.quiet_ticks = 0
        self.snapshot: reconcile.Snapshot | None = None

    async def run(self, stopped: Any, wake: asyncio.Event) -> None:
        """Tick until kopf stops the daemon. A finished job's loop sleeps until its TTL (or until
        woken, e.g. when `spec.ttlSecondsAfterFinished` is set later) instead of ending, so a TTL
        added after completion still applies. After an error it backs off, doubling to a minute."""
        interval = self.s.settings.reconcile_interval
        backoff = interval
        stop = asyncio.ensure_future(stopped.wait())  # set when the MLJob goes away or kopf exits
        try:
            while not stopped:
                sleep: float | None = interval
                wake.clear()  # before the step: a wake-up during the step is not lost
                try:
                    if await self.step():
                        sleep = self._until_ttl()
                    elif self.snapshot is not None:
                        sleep = reconcile.next_tick(
                            self.snapshot, self.quiet_ticks, interval, self.s.settings.idle_reconcile_interval
                        )
                    self.last_error, backoff = None, interval
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    self._log_error(err)
                    backoff = min(backoff * 2, MAX_ERROR_BACKOFF_SECONDS)
                    sleep = backoff
                woken = asyncio.ensure_future(wake.wait())
                await asyncio.wait({woken, stop}, timeout=sleep, return_when=asyncio.FIRST_COMPLETED)
                if woken.done():
                    self.quiet_ticks = 0  # a result or an exhausted item: look closely again
                woken.cancel()
        finally:
            stop.cancel()
            # kopf's `stopped` is read-only: is_set() takes no reason; the reason is a Flag.
            reason = stopped.reason
            if reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in reason:
                await self._cleanup_after_deletion()

    async def _cleanup_after_deletion(self) -> None:
        """kopf runs the delete handler while a step may still be finishing; a dispatch or
        re-dispatch in flight could recreate what the finalizer removed. Clean up once more."""
        try:
            await cleanup.cleanup_job(self.s, self.view.ref.uid, self.view.pipeline)
        except Exception as err:  # the orphan sweep removes whatever is left
            log.warning("cleanup after the deletion of %s failed: %s", self.view.ref.name, err)

    def _until_ttl(self) -> float | None:
        """Seconds until a finished job's MLJob is due for deletion; None: sleep until woken."""
        ttl = self.view.spec.get("ttlSecondsAfterFinished")
        finished = parse_time(self.view.status.get("completionTime"))
        if ttl is None or finished is None:
            return None
        return max(0.0, finished + int(ttl) - time.time()) + 0.5

    def _log_error(self, err: Exception) -> None:
        """The first occurrence with its traceback, repeats as one line."""
        line = f"{type(err).__name__}: {err}"
        ref = self.view.ref
        metrics.RECONCILE_ERRORS.inc()
        if line != self.last_error:
            log.exception("reconcile of %s/%s (%s) failed", ref.namespace, ref.name, ref.uid)
        else:
            log.warning("reconcile of %s/%s still failing: %s", ref.namespace, ref.name, line)
        self.last_error = line

    async def step(self) -> bool:
        """One reconcile; True when the job is finished and cleaned up (nothing to do but its TTL)."""
        started = metrics.started()
        view = self.view
        view.refresh_from_body()
        counts = None if view.phase in TERMINAL_PHASES else await self.s.state.counts(view.ref.uid)
        changed = counts != self.previous_counts
        self.previous_counts = counts
        plain = observe.snapshot(self.s, view, counts, None, self.watching_since)
        stream = (
            await observe.stream_view(self.s, view.pipeline, view.ref.uid)
            if reconcile.needs_stream_view(plain, changed)
            else None
        )
        snapshot = observe.snapshot(self.s, view, counts, stream, self.watching_since)
        plan = reconcile.decide(snapshot)
        self.snapshot = snapshot
        self.quiet_ticks = self.quiet_ticks + 1 if reconcile.is_quiet(plan, changed) else 0
        with metrics.reconcile_timer(plan.action, started):
            done = await self.act(plan, counts)
        metrics.JOBS.track(view.ref.uid, view.phase, view.pipeline, counts)
        return done

    async def act(self, plan: reconcile.Plan, counts: ItemCounts | None) -> bool:
        s, view = self.s, self.view
        match plan.action:
            case reconcile.Action.CLEANUP:
                if not self.cleaned:
                    await cleanup.cleanup_job(s, view.ref.uid, view.pipeline)
                    await cleanup.mirror_terminal_to_postgres(s, view)
                    self.cleaned = True
                return True
            case reconcile.Action.DELETE:
                if not self.cleaned:
                    await cleanup.cleanup_job(s, view.ref.uid, view.pipeline)
                await cleanup.delete_after_ttl(s, view)
                return True
            case reconcile.Action.CANCEL:
                return await self._ended(await cancel.cancel(s, view, plan))
            case reconcile.Action.DISPATCH:
                async with s.dispatch_slots:
                    await dispatch.dispatch(s, view)
            case reconcile.Action.REBUILD_STATE:
                if await state.rebuild(s, view):
                    return await self._ended(True)
            case reconcile.Action.FINISH:
                return await self._ended(await finish.finish(s, view, plan.verdict, counts))
            case reconcile.Action.FAIL_PENDING:
                return await self._ended(await fail_items.fail_pending(s, view, plan))
            case reconcile.Action.REDISPATCH:
                await redispatch.redispatch(s, view)
            case reconcile.Action.WAIT_FOR_WORKERS:
                await self.progress(plan.status, counts, stalled=plan.message)
            case reconcile.Action.PROGRESS:
                await self.progress(plan.status, counts)
        return False

    async def _ended(self, shown: bool) -> bool:
        """After a terminal transition: clean up at once (the TTL, if any, is waited for next)."""
        if not shown:
            return False  # the MLJob does not show the verdict yet: try again next tick
        await cleanup.cleanup_job(self.s, self.view.ref.uid, self.view.pipeline)
        self.cleaned = True
        return True

    async def progress(self, fields: dict[str, Any], counts: ItemCounts | None, stalled: str = "") -> None:
        view = self.view
        desired = dict(fields)
        if counts is not None and counts.last_activity is not None:
            desired["lastActivityTime"] = iso(counts.last_activity)
        updates: list[tuple[str, str, str, str]] = [
            (
                "Progressing",
                "True",
                "ItemsProcessing",
                f"{desired['processed']} of {desired['total']} items processed",
            )
        ]
        was_stalled = view.has_condition("Stalled")
        if stalled:
            updates.append(("Stalled", "True", "WaitingForWorkers", stalled))
        elif was_stalled:
            updates.append(("Stalled", "False", "WorkMoving", "work is moving again"))
        if view.has_condition("StateAvailable", "False"):
            updates.append(("StateAvailable", "True", "StateFound", "the job's per-item state is available"))
        before = dict(view.status)
        await view.set_conditions(*updates, extra=desired)
        if stalled and not was_stalled:  # once per stall, not once per tick
            log.warning("job %s/%s: %s", view.ref.namespace, view.ref.name, stalled)
        if counts is not None and view.phase is not None and reconcile.status_delta(before, desired):
            await self.s.jobs.progress(
                view.ref.uid,
                view.phase,
                counts,
                int(view.status.get("dispatched", 0)),
                self.s.settings.actor,
            )
