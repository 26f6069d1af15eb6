"""What the operator keeps of each MLJob between watch events, and which events matter.

kopf's daemons kept every MLJob's whole body, managed fields included (about 19 KB each, more
with inline items). The scheduler keeps a slim copy instead: the identity and versions, the
finalizers and deletion mark, the spec without its items and params (dispatch reads those from
the API server once, when it needs them), and the status. Pure: dicts in, dicts out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mljob.api.models import Phase

#: Our finalizer: cleanup (consumer, keys, registry entry, the ledger's verdict) runs before an
#: MLJob goes away. The name kopf used for it, so MLJobs created under kopf's daemons keep theirs.
FINALIZER = "mljob.dev/cleanup"
#: Spec fields that can be large and that only dispatch and re-dispatch read.
BULKY_SPEC_FIELDS = ("items", "params")
#: Metadata the controller reads.
KEPT_METADATA = (
    "namespace",
    "name",
    "uid",
    "generation",
    "resourceVersion",
    "deletionTimestamp",
    "finalizers",
)
#: Phases after which the item source is never read again, unless the stream is lost.
DISPATCHED_PHASES = frozenset(
    {Phase.RUNNING, Phase.CANCELING, Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED}
)


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """The few fields of an MLJob the scheduler and its loop use. A job that is not dispatched
    yet keeps its items and params: its first reconcile dispatches without another GET."""
    meta = body.get("metadata") or {}
    spec = dict(body.get("spec") or {})
    status = dict(body.get("status") or {})
    if status.get("phase") in DISPATCHED_PHASES:
        for field in BULKY_SPEC_FIELDS:
            spec.pop(field, None)
    return {
        "metadata": {key: meta[key] for key in KEPT_METADATA if key in meta},
        "spec": spec,
        "status": status,
    }


def has_full_spec(body: Mapping[str, Any]) -> bool:
    """Whether the spec still carries what dispatch needs (an inline job's items)."""
    spec = body.get("spec") or {}
    return "itemsFrom" in spec or "items" in spec


def deleting(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


def finalized(body: Mapping[str, Any]) -> bool:
    return FINALIZER in ((body.get("metadata") or {}).get("finalizers") or [])


def worth_a_look(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> bool:
    """Whether a watch event should make the job due at once.

    New to this operator; the spec edited (generation: `spec.cancel`, the TTL, the deadline);
    deletion begun; our finalizer added or removed by someone; the phase changed (another
    replica's verdict, or one of our own writes: one extra look per phase, no write). A status
    write of ours that changed no phase (progress, a condition) is not: the loop paces itself.
    """
    if before is None:
        return True
    meta_b, meta_a = before.get("metadata") or {}, after.get("metadata") or {}
    return (
        meta_b.get("generation") != meta_a.get("generation")
        or deleting(before) != deleting(after)
        or finalized(before) != finalized(after)
        or (before.get("status") or {}).get("phase") != (after.get("status") or {}).get("phase")
    )
