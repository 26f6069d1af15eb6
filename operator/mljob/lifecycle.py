"""The per-job reconcile loop: observe, decide (mljob.core.reconcile), act.

One loop runs per MLJob (a kopf daemon). An idle tick is one Redis round trip and no write.
The collector wakes the loop when a job's pending count reaches zero, so the terminal status
lands within about a second of the last result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.kube import JobRef
from mljob.api.models import TERMINAL_PHASES, MLJobSpec, Phase
from mljob.core import reconcile
from mljob.core.conditions import same_conditions, set_condition
from mljob.core.counts import ItemCounts
from mljob.core.items import ItemSourceError
from mljob.dispatch import (
    DispatchTarget,
    SourceNotReady,
    load_items,
    publish_chunk,
    stream_settings,
    task_bodies,
)
from mljob.finish import finish_job, iso, mirror_phase, now_iso
from mljob.services import Services

log = logging.getLogger(__name__)


class JobLoop:
    """Drives one MLJob from Pending to a terminal phase, then cleans up after it."""

    def __init__(self, services: Services, body: Mapping[str, Any]) -> None:
        self.s = services
        meta = body["metadata"]
        self.ref = JobRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
        self.body = body  # kopf keeps this view live
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self.generation = int(meta.get("generation", 1))

    # ------------------------------------------------------------------ helpers
    @property
    def phase(self) -> Phase | None:
        value = self.status.get("phase")
        return Phase(value) if value else None

    def _live_spec(self) -> Mapping[str, Any]:
        return self.body.get("spec") or {}

    async def _write(self, fields: dict[str, Any]) -> None:
        if not fields:
            return
        await self.s.kube.patch_status(self.ref, fields)
        self.status.update(fields)

    def _condition(self, type_: str, status: str, reason: str, message: str) -> list[dict[str, Any]]:
        return set_condition(
            self.status.get("conditions", []), type_, status, reason, message, self.generation, now_iso()
        )

    async def _set_conditions(
        self, *updates: tuple[str, str, str, str], extra: dict[str, Any] | None = None
    ) -> None:
        conditions = self.status.get("conditions", [])
        for type_, status, reason, message in updates:
            conditions = set_condition(conditions, type_, status, reason, message, self.generation, now_iso())
        fields = dict(extra or {})
        if not same_conditions(conditions, self.status.get("conditions", [])):
            fields["conditions"] = conditions
        fields = reconcile.status_delta(self.status, fields)
        await self._write(fields)

    # ------------------------------------------------------------------ loop
    async def run(self, stopped: Any, wake: asyncio.Event) -> None:
        while not stopped:
            try:
                if await self.step():
                    return
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning(
                    "reconcile of %s/%s failed: %s: %s",
                    self.ref.namespace,
                    self.ref.name,
                    type(err).__name__,
                    err,
                )
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=self.s.settings.reconcile_interval)

    async def step(self) -> bool:
        """One reconcile; True when the job is terminal and cleaned up (the loop may end)."""
        body_status = self.body.get("status") or {}
        if body_status.get("phase") in TERMINAL_PHASES:  # someone else finished it
            self.status = dict(body_status)
        counts = await self.s.state.counts(self.ref.uid)
        snapshot = reconcile.Snapshot(
            phase=self.phase,
            cancel=bool(self._live_spec().get("cancel", False)),
            failure_threshold=float(self._live_spec().get("failureThreshold", 0.5)),
            dispatched=int(self.status.get("dispatchCursor", 0)),
            total=self.status.get("total"),
            counts=counts,
        )
        plan = reconcile.decide(snapshot)
        if plan.action is reconcile.Action.CLEANUP:
            await self.cleanup()
            await self._mirror_terminal_to_postgres()
            return True
        if plan.action is reconcile.Action.DISPATCH:
            await self.dispatch()
        elif plan.action is reconcile.Action.STATE_MISSING:
            if await self._mirror_postgres_verdict():
                await self.cleanup()
                return True
            await self._set_conditions(
                (
                    "StateAvailable",
                    "False",
                    "StateMissing",
                    "the job's per-item state is missing from Redis; it is not treated as complete",
                )
            )
        elif plan.action is reconcile.Action.PROGRESS:
            await self.progress(plan.status, counts)
        elif plan.action is reconcile.Action.FINISH:
            assert plan.verdict is not None
            if not await self.finish(plan.verdict, counts):
                return False  # the MLJob does not show the verdict yet: try again next tick
            await self.cleanup()
            return True
        return False

    async def progress(self, fields: dict[str, Any], counts: ItemCounts | None) -> None:
        desired = dict(fields)
        if counts is not None and counts.last_activity is not None:
            desired["lastActivityTime"] = iso(counts.last_activity)
        delta = reconcile.status_delta(self.status, desired)
        if not delta:
            return  # idle: no write anywhere
        conditions = self._condition(
            "Progressing",
            "True",
            "ItemsProcessing",
            f"{desired['processed']} of {desired['total']} items processed",
        )
        if not same_conditions(conditions, self.status.get("conditions", [])):
            delta["conditions"] = conditions
        await self._write(delta)
        if counts is not None and self.phase is not None:
            await self.s.jobs.progress(
                self.ref.uid, self.phase, counts, int(self.status.get("dispatched", 0))
            )

    # ------------------------------------------------------------------ dispatch
    async def dispatch(self) -> None:
        try:
            spec = MLJobSpec.model_validate(dict(self._live_spec()))
        except ValidationError as err:
            first = err.errors()[0]
            await self.fail_early("InvalidSpec", f"spec.{'.'.join(map(str, first['loc']))}: {first['msg']}")
            return
        target = DispatchTarget(self.ref.uid, self.ref.namespace, self.ref.name, spec)
        snapshot_spec = spec.model_dump(by_alias=True, exclude={"items"}, exclude_none=True)
        await self.s.jobs.ensure(
            self.ref.uid, self.ref.namespace, self.ref.name, spec.pipeline, snapshot_spec
        )
        try:
            items = await load_items(target, self.s.kube.configmap_data)
        except SourceNotReady as err:
            await self._set_conditions(
                ("ItemsSourceReady", "False", "ItemsSourceMissing", str(err)),
                extra={} if self.phase else {"phase": Phase.PENDING.value},
            )
            return
        except ItemSourceError as err:
            await self.fail_early("InvalidItems", str(err))
            return
        if self.phase in (None, Phase.PENDING):
            await self._mark_dispatching(len(items), spec.pipeline)
        # Per-item state first, complete, before any task can be published (row 9).
        await self.s.state.initialize(self.ref.uid, [item["id"] for item in items])
        settings = self.s.settings
        entry = await jetstream.ensure_job_stream(
            self.s.js, stream_settings(target, settings.stream_replicas, settings.max_ack_pending)
        )
        await jetstream.register_job(self.s.registry, entry)
        if await self._publish_from_cursor(target, entry.subject, items):
            await self._mark_running(len(items))

    async def _mark_dispatching(self, total: int, pipeline: str) -> None:
        fields: dict[str, Any] = {
            "phase": Phase.DISPATCHING.value,
            "total": total,
            "dispatched": 0,
            "dispatchCursor": 0,
            "processed": 0,
            "failed": 0,
            "pending": total,
            "progress": "0%",
            "startTime": self.status.get("startTime") or now_iso(),
            "observedGeneration": self.generation,
        }
        conditions = self._condition("ItemsSourceReady", "True", "ItemsLoaded", f"{total} items loaded")
        fields["conditions"] = set_condition(
            conditions,
            "Dispatched",
            "False",
            "Dispatching",
            f"publishing {total} tasks",
            self.generation,
            now_iso(),
        )
        await self._write(fields)
        await self.s.jobs.set_phase(self.ref.uid, Phase.DISPATCHING, self.s.settings.actor)
        await self.s.kube.event(self.ref, "Dispatching", f"publishing {total} tasks to pipeline {pipeline}")

    async def _publish_from_cursor(self, target: DispatchTarget, subject: str, items: list[Any]) -> bool:
        """Publish the items not yet covered by the cursor; False when cancelled meanwhile."""
        cursor = int(self.status.get("dispatchCursor", 0))
        while cursor < len(items):
            if self._live_spec().get("cancel"):
                return False  # the next tick finishes the job as Cancelled
            chunk = items[cursor : cursor + self.s.settings.dispatch_chunk]
            await publish_chunk(self.s.js, subject, task_bodies(target, chunk))
            cursor += len(chunk)
            await self._write({"dispatchCursor": cursor, "dispatched": cursor})
        return True

    async def _mark_running(self, total: int) -> None:
        conditions = self._condition("Dispatched", "True", "AllTasksPublished", f"{total} tasks published")
        await self._write({"phase": Phase.RUNNING.value, "conditions": conditions})
        await self.s.jobs.set_phase(self.ref.uid, Phase.RUNNING, self.s.settings.actor)
        await self.s.kube.event(self.ref, "Running", f"all {total} tasks published")

    async def fail_early(self, reason: str, message: str) -> None:
        """A job whose spec or items are unusable fails before anything is dispatched."""
        log.info("job %s/%s failed: %s", self.ref.namespace, self.ref.name, message)
        if self.phase is None:
            await self._write({"phase": Phase.PENDING.value})
        await self.finish(reconcile.Verdict(Phase.FAILED, reason, message), None)

    # ------------------------------------------------------------------ finish
    async def finish(self, verdict: reconcile.Verdict, counts: ItemCounts | None) -> bool:
        """The guarded terminal transition; True once the MLJob shows the verdict."""
        pipeline = str(self._live_spec().get("pipeline", ""))
        await self.s.jobs.ensure(self.ref.uid, self.ref.namespace, self.ref.name, pipeline, {})
        _, _, shown = await finish_job(
            self.s.jobs, self.s.kube, self.ref, self.generation, verdict, counts, self.s.settings.actor
        )
        fresh = await self.s.kube.get_job(self.ref.namespace, self.ref.name)
        if fresh is not None:
            self.status = dict(fresh.get("status") or {})
        return shown

    async def _mirror_postgres_verdict(self) -> bool:
        """Postgres already terminal while the MLJob is not (a crash between the two writes):
        the MLJob mirrors the arbiter. True when it now shows a terminal phase."""
        row = await self.s.jobs.get(self.ref.uid)
        if row is None or row.phase not in TERMINAL_PHASES:
            return False
        return await mirror_phase(
            self.s.kube, self.ref, self.generation, row.phase, row.reason or "", row.message or "", row.counts
        )

    async def _mirror_terminal_to_postgres(self) -> None:
        """A CR that is terminal but whose row is not (e.g. written before a crash) gets the row fixed."""
        phase = self.phase
        if phase is None or phase not in TERMINAL_PHASES:
            return
        row = await self.s.jobs.get(self.ref.uid)
        if row is not None and row.phase not in TERMINAL_PHASES:
            reason = next(
                (
                    c.get("reason", "")
                    for c in self.status.get("conditions", [])
                    if c.get("type") == "Complete"
                ),
                "",
            )
            await self.s.jobs.finish(
                self.ref.uid, phase, reason, "mirrored from the MLJob status", None, self.s.settings.actor
            )

    # ------------------------------------------------------------------ cleanup
    async def cleanup(self) -> None:
        await cleanup_job(self.s, self.ref.uid, str(self._live_spec().get("pipeline", "")))


async def cleanup_job(services: Services, uid: str, pipeline: str) -> None:
    """Idempotent: the stream and its consumer, the Redis keys, the registry entry."""
    if pipeline:
        await jetstream.unregister_job(services.registry, pipeline, uid)
    await jetstream.delete_job_stream(services.js, uid)
    await services.state.delete(uid)
    services.wakeups.pop(uid, None)
    log.debug("cleaned up job %s (%s)", uid, protocol.task_stream(uid))
