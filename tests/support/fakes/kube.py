"""A fake of the Kubernetes adapter: MLJobs with the API server's status rules and guarded patch."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client.rest import ApiException

from mljob.adapters.kube import GuardFailed, JobRef, StatusRefused
from mljob.api.models import GROUP, KIND, VERSION, Phase
from mljob.core.phases import CEL_TRANSITION_MESSAGE, can_transition


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
        if not can_transition(Phase(old_phase), Phase(new_phase)):
            return f"{CEL_TRANSITION_MESSAGE} ({old_phase} -> {new_phase})"
    for key in ("processed", "failed"):
        if key in old and (key not in new or int(new[key]) < int(old[key])):
            return f"status.{key} never decreases ({old[key]} -> {new.get(key)})"
    if "completionTime" in old and new.get("completionTime") != old["completionTime"]:
        return "status.completionTime never changes once set"
    return None


def _bump(body: dict[str, Any]) -> None:
    """Every write gives the object a new resourceVersion, as on a real API server."""
    body["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)


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
            "metadata": {
                "namespace": namespace,
                "name": name,
                "uid": str(uuid.uuid4()),
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": copy.deepcopy(spec),
        }
        self.jobs[(namespace, name)] = body
        return body

    def edit_spec(self, body: Mapping[str, Any], **changes: Any) -> None:
        """`kubectl patch` of the spec: the generation moves, as on a real API server."""
        live = self.jobs[(body["metadata"]["namespace"], body["metadata"]["name"])]
        live["spec"].update(changes)
        live["metadata"]["generation"] += 1
        _bump(live)

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
        _bump(body)

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.jobs.get((namespace, name))
        return copy.deepcopy(body) if body is not None else None

    async def list_jobs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(b) for (ns, _), b in self.jobs.items() if namespaces is None or ns in namespaces
        ]

    async def patch_status(self, job: JobRef, fields: dict[str, Any]) -> None:
        """As the adapter: the server's transition rules refuse with StatusRefused."""
        body = self._live(job)
        try:
            self._commit(body, _merge(body.get("status") or {}, fields))
        except ApiException as err:
            raise StatusRefused(str(err.reason)) from err

    async def guarded_status(
        self,
        job: JobRef,
        expected_phase: str | None,
        fields: dict[str, Any],
        resource_version: str | None = None,
    ) -> None:
        """The JSON patch's `test` ops (uid, phase or resourceVersion) and the server's rules both
        raise GuardFailed."""
        body = self._live(job)
        if body["metadata"]["uid"] != job.uid:
            raise GuardFailed("uid changed")
        current = body.get("status") or {}
        if expected_phase is None:
            if not resource_version:
                raise ValueError("a status with no phase is replaced only at the resourceVersion read")
            if body["metadata"]["resourceVersion"] != resource_version:
                raise GuardFailed(f"resourceVersion is {body['metadata']['resourceVersion']}")
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
        """As the API server: an object with finalizers is only marked (deletionTimestamp) and
        goes once the last finalizer is removed. `deleted` records the accepted request."""
        body = self.jobs.get((job.namespace, job.name))
        if body is None or body["metadata"]["uid"] != job.uid:
            return
        self.deleted.append(job)
        if body["metadata"].get("finalizers"):
            body["metadata"].setdefault("deletionTimestamp", "2026-01-01T00:00:00Z")
            _bump(body)
        else:
            del self.jobs[(job.namespace, job.name)]

    async def add_finalizer(
        self, job: JobRef, finalizer: str, current: list[str], resource_version: str
    ) -> None:
        body = self.jobs.get((job.namespace, job.name))
        if body is None:
            return
        meta = body["metadata"]
        if meta["uid"] != job.uid:
            raise GuardFailed("uid changed")
        if not current and meta["resourceVersion"] != resource_version:
            raise GuardFailed(f"resourceVersion is {meta['resourceVersion']}")
        meta["finalizers"] = [*(meta.get("finalizers") or []), finalizer]
        _bump(body)

    async def remove_finalizer(self, job: JobRef, finalizer: str, current: list[str]) -> None:
        body = self.jobs.get((job.namespace, job.name))
        if body is None or finalizer not in current:
            return
        meta = body["metadata"]
        at = current.index(finalizer)
        present = meta.get("finalizers") or []
        if meta["uid"] != job.uid or len(present) <= at or present[at] != finalizer:
            raise GuardFailed("the finalizers changed")
        meta["finalizers"] = present[:at] + present[at + 1 :]
        _bump(body)
        if not meta["finalizers"] and meta.get("deletionTimestamp"):
            del self.jobs[(job.namespace, job.name)]

    async def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        data = self.configmaps.get((namespace, name))
        return dict(data) if data is not None else None

    async def event(self, job: JobRef, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(RecordedEvent(job.uid, reason, message, "Warning" if warning else "Normal"))
