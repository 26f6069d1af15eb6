"""One MLJob's reconcile: observe, decide (mljob.core.reconcile), act (mljob.controller.actions).

The scheduler (mljob.controller.scheduler) calls `JobLoop.tick` whenever the job is due; no task
runs per MLJob. An idle tick is one Redis round trip, plus one NATS round trip when the job's
counts did not move, and no write; a job that stays quiet is looked at less and less often
(`reconcile.next_tick`, up to `MLJOB_IDLE_RECONCILE_INTERVAL`). The collector, the
exhausted-deliveries watcher and watch events make a job due at once, so the terminal status
lands within about a second of the last outcome. The finalizer is the loop's own: added before
anything exists in NATS or Redis, removed once a deleted job is cleaned up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from mljob.adapters.services import Services
from mljob.api.models import TERMINAL_PHASES
from mljob.controller import observe
from mljob.controller.actions import (
    cancel,
    cleanup,
    dispatch,
    fail_items,
    finish,
    redispatch,
    replace_consumer,
    state,
)
from mljob.controller.jobview import JobView, iso, parse_time
from mljob.core import index, reconcile
from mljob.core.counts import ItemCounts
from mljob.ops import metrics

log = logging.getLogger(__name__)

#: After an unexpected error the job is looked at again after a back-off doubling up to this
#: long (a traceback is logged once).
MAX_ERROR_BACKOFF_SECONDS = 60.0


class CleanupFailed(Exception):
    """A deleted MLJob's cleanup failed: retried; the message says how to remove it without."""


class JobLoop:
    """Drives one MLJob from Pending to a terminal phase, cleans up, deletes it after its TTL,
    and releases it once deleted."""

    def __init__(self, services: Services, body: Mapping[str, Any]) -> None:
        self.s = services
        self.view = JobView(services.kube, body)
        self.watching_since = time.time()
        self.previous_counts: ItemCounts | None = None
        self.cleaned = False
        self.last_error: str | None = None
        self.backoff = services.settings.reconcile_interval
        #: consecutive ticks that found the running job as it was, and the latest snapshot
        self.quiet_ticks = 0
        self.snapshot: reconcile.Snapshot | None = None
        self._prefetched: tuple[ItemCounts | None] | None = None
        #: since when every look found the job's consumer not answering (reconcile.silent_since)
        self.consumer_silent_since: float | None = None

    @property
    def uid(self) -> str:
        return self.view.ref.uid

    def observe(self, body: Mapping[str, Any]) -> None:
        """The latest body from the watch (spec, metadata; the status we keep is our own)."""
        self.view.body = body

    def watch_afresh(self) -> None:
        """This replica starts working on the job (at start, or taking over from another):
        activity is counted from now, so a restart or a failover never counts as a stall, and
        the status is the watched one, which the previous leader wrote."""
        self.watching_since = time.time()
        self.view.adopt_body_status()

    def wants_counts(self) -> bool:
        """Whether the next tick reads the job's Redis counts (so a batched read can serve it)."""
        return self.view.phase not in TERMINAL_PHASES and not index.deleting(self.view.body)

    def prefetched(self, counts: ItemCounts | None) -> None:
        """Counts read for this job together with others, for its next tick only."""
        self._prefetched = (counts,)

    def woken(self) -> None:
        """A result, an exhausted item or an edit: look closely again."""
        self.quiet_ticks = 0

    async def tick(self) -> float | None:
        """One reconcile; seconds until the job should be looked at again, None when only a
        wake-up can give it anything to do (finished without a TTL, or released after deletion).
        After an error the delay backs off, doubling to a minute."""
        interval = self.s.settings.reconcile_interval
        try:
            if index.deleting(self.view.body):
                await self.release()
                return None
            await self.ensure_finalizer()
            if await self.step():
                sleep = self._until_ttl()
            elif self.snapshot is not None:
                sleep = reconcile.next_tick(
                    self.snapshot, self.quiet_ticks, interval, self.s.settings.idle_reconcile_interval
                )
            else:
                sleep = interval
            if self.uid in self.s.dispatch_line and sleep is not None:
                # In line for a dispatch slot: the dispatch that frees one wakes it, so its own
                # pacing is only a safety net (thousands of MLJobs created together would
                # otherwise each be re-looked every few seconds while they wait).
                sleep = max(sleep, self.s.settings.idle_reconcile_interval)
        except Exception as err:
            self._log_error(err)
            self.backoff = min(max(self.backoff, interval) * 2, MAX_ERROR_BACKOFF_SECONDS)
            return self.backoff
        finally:
            self._prefetched = None  # for this tick only, used or not
        self.last_error, self.backoff = None, interval
        return sleep

    async def ensure_finalizer(self) -> None:
        """Our finalizer before anything of the job exists in NATS, Redis or Postgres; one patch,
        once per MLJob (no diff-base annotation, no progress annotations)."""
        body = self.view.body
        if index.finalized(body):
            return
        meta = body["metadata"]
        current = list(meta.get("finalizers") or [])
        await self.s.kube.add_finalizer(
            self.view.ref, index.FINALIZER, current, str(meta.get("resourceVersion"))
        )
        meta["finalizers"] = [*current, index.FINALIZER]  # until the watch brings the object back

    async def release(self) -> None:
        """The MLJob is being deleted: clean up (a job that was not terminal is recorded as
        Cancelled, reason Deleted, in Postgres), then remove our finalizer."""
        body, ref = self.view.body, self.view.ref
        meta = body["metadata"]
        current = list(meta.get("finalizers") or [])
        if index.FINALIZER not in current:
            return
        try:
            await cleanup.on_deleted(self.s, ref, self.view.pipeline, self.view.consumer_generation)
        except Exception as err:
            raise CleanupFailed(
                f"cleanup of {ref.namespace}/{ref.name} failed ({type(err).__name__}: {err}); retrying. "
                "To remove the MLJob without cleanup, see docs/operations.md 'Force-delete an MLJob'"
            ) from err
        # GuardFailed: another controller changed the finalizers since the event we hold; the
        # watch brings the new list and the next look (after the error back-off) removes ours.
        await self.s.kube.remove_finalizer(ref, index.FINALIZER, current)
        meta["finalizers"] = [f for f in current if f != index.FINALIZER]

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
        counts = None if view.phase in TERMINAL_PHASES else await self._counts()
        changed = counts != self.previous_counts
        self.previous_counts = counts
        plain = observe.snapshot(self.s, view, counts, None, self.watching_since)
        stream = (
            await observe.stream_view(self.s, view.pipeline, view.ref.uid, view.consumer_generation)
            if reconcile.needs_stream_view(plain, changed)
            else None
        )
        self.consumer_silent_since = reconcile.silent_since(
            self.consumer_silent_since, stream, changed, time.time()
        )
        snapshot = observe.snapshot(
            self.s, view, counts, stream, self.watching_since, self.consumer_silent_since
        )
        plan = reconcile.decide(snapshot)
        self.snapshot = snapshot
        self.quiet_ticks = self.quiet_ticks + 1 if reconcile.is_quiet(plan, changed) else 0
        with metrics.reconcile_timer(plan.action, started):
            done = await self.act(plan, counts)
        metrics.JOBS.track(view.ref.uid, view.phase, view.pipeline, counts)
        return done

    async def _counts(self) -> ItemCounts | None:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            return prefetched[0]
        return await self.s.state.counts(self.view.ref.uid)

    async def act(self, plan: reconcile.Plan, counts: ItemCounts | None) -> bool:
        s, view = self.s, self.view
        if plan.action is not reconcile.Action.DISPATCH:
            s.dispatch_line.pop(view.ref.uid, None)  # no longer waiting for a slot (cancelled, edited)
        match plan.action:
            case reconcile.Action.CLEANUP:
                if not self.cleaned:
                    await cleanup.cleanup_job(s, view.ref.uid, view.pipeline, view.consumer_generation)
                    await cleanup.mirror_terminal_to_postgres(s, view)
                    self.cleaned = True
                return True
            case reconcile.Action.DELETE:
                if not self.cleaned:
                    await cleanup.cleanup_job(s, view.ref.uid, view.pipeline, view.consumer_generation)
                await cleanup.delete_after_ttl(s, view)
                return True
            case reconcile.Action.CANCEL:
                return await self._ended(await cancel.cancel(s, view, plan))
            case reconcile.Action.DISPATCH:
                await self._dispatch_in_turn()
            case reconcile.Action.REBUILD_STATE:
                if await state.rebuild(s, view):
                    return await self._ended(True)
            case reconcile.Action.FINISH:
                return await self._ended(await finish.finish(s, view, plan.verdict, counts))
            case reconcile.Action.FAIL_PENDING:
                return await self._ended(await fail_items.fail_pending(s, view, plan))
            case reconcile.Action.REDISPATCH:
                await redispatch.redispatch(s, view)
            case reconcile.Action.REPLACE_CONSUMER:
                await replace_consumer.replace_consumer(s, view)
                self.consumer_silent_since = None
            case reconcile.Action.WAIT_FOR_WORKERS:
                await self.progress(plan.status, counts, stalled=plan.message)
            case reconcile.Action.PROGRESS:
                await self.progress(plan.status, counts)
        return False

    async def _dispatch_in_turn(self) -> None:
        """Dispatch when a slot is free; else wait in line holding no reconcile worker: the job
        that waited longest is woken when a dispatch ends."""
        s, uid = self.s, self.view.ref.uid
        if s.dispatch_slots.locked():
            s.dispatch_line[uid] = None
            return
        s.dispatch_line.pop(uid, None)
        try:
            async with s.dispatch_slots:
                await dispatch.dispatch(s, self.view)
        finally:
            while s.dispatch_line:  # the longest waiting job still managed (not deleted)
                next_in_line = next(iter(s.dispatch_line))
                del s.dispatch_line[next_in_line]
                if next_in_line in s.managed:
                    s.wake(next_in_line)
                    break

    async def _ended(self, shown: bool) -> bool:
        """After a terminal transition: clean up at once (the TTL, if any, is waited for next)."""
        if not shown:
            return False  # the MLJob does not show the verdict yet: try again next tick
        await cleanup.cleanup_job(
            self.s, self.view.ref.uid, self.view.pipeline, self.view.consumer_generation
        )
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
