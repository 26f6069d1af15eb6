"""The one status view of an MLJob that the reconcile loop and its actions share.

The scheduler replaces `body` with the slim copy of each watch event (`core.index.slim`: spec
and metadata follow the watch stream), but the status we wrote a moment ago may not be back
from the watch yet. So the view keeps the status as we last wrote or read it, and takes
everything else from the latest body: in particular `generation`, which changes when
`spec.cancel` or `spec.ttlSecondsAfterFinished` is edited, is read fresh every time a condition
or observedGeneration is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from mljob.adapters.kube import JobRef, Kube, StatusRefused
from mljob.adapters.tasks import DispatchTarget
from mljob.api.models import MAX_DIAGNOSTICS, TERMINAL_PHASES, MLJobSpec, Phase
from mljob.core import index, reconcile
from mljob.core.conditions import same_conditions, set_condition


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class JobView:
    """Status as last written or read, spec and generation from kopf's live body."""

    def __init__(self, kube: Kube, body: Mapping[str, Any]) -> None:
        self.kube = kube
        self.body = body
        meta = body["metadata"]
        self.ref = JobRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
        self.status: dict[str, Any] = dict(body.get("status") or {})

    @property
    def spec(self) -> Mapping[str, Any]:
        return self.body.get("spec") or {}

    @property
    def generation(self) -> int:
        return int(self.body["metadata"].get("generation", 1))

    @property
    def phase(self) -> Phase | None:
        value = self.status.get("phase")
        return Phase(value) if value else None

    @property
    def resource_version(self) -> str:
        """The version of the object as kopf last saw it: what a whole-status write is guarded by."""
        return str(self.body["metadata"].get("resourceVersion", ""))

    @property
    def pipeline(self) -> str:
        return str(self.spec.get("pipeline", ""))

    @property
    def consumer_generation(self) -> int:
        """Which of the job's consumers is current (`protocol.task_consumer`)."""
        return int(self.status.get("consumerGeneration") or 0)

    def refresh_from_body(self) -> None:
        """A terminal phase someone else wrote (another replica, a mirrored verdict) wins."""
        body_status = self.body.get("status") or {}
        if body_status.get("phase") in TERMINAL_PHASES and self.phase not in TERMINAL_PHASES:
            self.status = dict(body_status)

    async def fetch(self) -> dict[str, Any] | None:
        """The MLJob as the API server has it now; None when it is gone (or re-created)."""
        fresh = await self.kube.get_job(self.ref.namespace, self.ref.name)
        if fresh is None or fresh["metadata"]["uid"] != self.ref.uid:
            return None
        return fresh

    async def reload(self) -> bool:
        """Read the status from the API server; False when the MLJob is gone."""
        fresh = await self.fetch()
        if fresh is None:
            return False
        self.status = dict(fresh.get("status") or {})
        return True

    def adopt_body_status(self) -> None:
        """Take the watched status for the truth: a replica that only watched wrote none of it
        (the leader did), so its own copy is the one of the first event it saw."""
        self.status = dict(self.body.get("status") or {})

    async def write(self, fields: dict[str, Any]) -> None:
        """Merge-patch only what differs from the view: an idle tick writes nothing.

        When the API server refuses the patch as a move backwards, this view was behind the
        stored status (another replica wrote it, the watch had not caught up): the status is
        read again, so the next tick decides on what is stored, and the refusal re-raised."""
        delta = reconcile.status_delta(self.status, fields)
        if not delta:
            return
        try:
            await self.kube.patch_status(self.ref, delta)
        except StatusRefused:
            await self.reload()
            raise
        self.status.update(delta)

    def conditions_with(self, *updates: tuple[str, str, str, str]) -> list[dict[str, Any]]:
        conditions: list[dict[str, Any]] = list(self.status.get("conditions", []))
        for type_, status, reason, message in updates:
            conditions = set_condition(conditions, type_, status, reason, message, self.generation, now_iso())
        return conditions

    def has_condition(self, type_: str, status: str = "True", reason: str | None = None) -> bool:
        return any(
            c.get("type") == type_ and c.get("status") == status and reason in (None, c.get("reason"))
            for c in self.status.get("conditions", [])
        )

    async def set_conditions(
        self, *updates: tuple[str, str, str, str], extra: dict[str, Any] | None = None
    ) -> None:
        fields = dict(extra or {})
        conditions = self.conditions_with(*updates)
        if not same_conditions(conditions, self.status.get("conditions", [])):
            fields["conditions"] = conditions
        await self.write(fields)

    def with_diagnostic(self, reason: str, message: str) -> list[dict[str, Any]]:
        """The bounded diagnostics list with one entry appended (oldest dropped)."""
        entries = list(self.status.get("diagnostics", []))
        entries.append({"time": now_iso(), "reason": reason, "message": message[:4096]})
        return entries[-MAX_DIAGNOSTICS:]


async def target_of(view: JobView) -> DispatchTarget:
    """The validated spec as dispatch and re-dispatch need it. The slim body of a dispatched job
    has no items or params: they are read from the API server (a re-dispatch, rare). Raises
    pydantic's ValidationError for a spec the API server should have refused, and
    `JobGone` when the MLJob no longer exists."""
    spec: Mapping[str, Any] = view.spec
    if not index.has_full_spec(view.body):
        fresh = await view.fetch()
        if fresh is None:
            raise JobGone(f"the MLJob {view.ref.namespace}/{view.ref.name} no longer exists")
        spec = fresh.get("spec") or {}
    validated = MLJobSpec.model_validate(dict(spec))
    return DispatchTarget(
        view.ref.uid, view.ref.namespace, view.ref.name, validated, view.consumer_generation
    )


class JobGone(Exception):
    """The MLJob was deleted (or re-created under a new uid) while its job was being worked on."""
