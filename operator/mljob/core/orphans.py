"""Which per-job resources are orphans: a pure decision, no I/O (failure-modes row 13).

A job consumer, registry entry or set of Redis keys is an orphan when no live, non-terminal
MLJob has its UID. The caller must observe the resources FIRST and list the MLJobs AFTER:
a resource can only exist once its job exists, so every job whose resource was observed is
in the (later) listing unless it is gone or terminal. A job created meanwhile has no observed
resources, and so can never be mistaken for an orphan.

The listing must be COMPLETE (every watched namespace listed successfully); the caller skips
the sweep otherwise, because a missing namespace would make all its jobs look like orphans.

Ownership, for several installations sharing one NATS account: a resource is owned by the
namespace of its job row in this installation's Postgres (a registry entry names its own
namespace). A namespaced operator removes only what its namespaces own; a resource with no
known owner is removed only by a cluster-wide operator, which sees every MLJob.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mljob.api.models import TERMINAL_PHASES

#: A Kubernetes object UID (RFC 4122 text form). Anything else is never a job's and never swept,
#: so shared names that share a prefix (MLJOB_RESULTS, MLJOB_ADVISORIES) are safe by construction.
_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_job_uid(text: str) -> bool:
    return _UID.fullmatch(text) is not None


class Kind(StrEnum):
    TASKS = "tasks"  # a job's consumer and its task messages on its pipeline's stream
    REGISTRY = "registry"
    REDIS = "redis"


class Verdict(StrEnum):
    ORPHAN = "orphan"  # remove it
    LIVE = "live"  # a live, non-terminal MLJob has this UID
    YOUNG = "young"  # younger than the grace period (or age unknown with a grace period)
    NOT_OURS = "not-ours"  # owned by a namespace this operator does not watch, or by nobody known
    NOT_A_JOB = "not-a-job"  # the name carries no job UID (a shared stream, a foreign key)


@dataclass(frozen=True)
class Resource:
    """One observed per-job resource.

    ``name`` is what identifies it to a human and to the deleter: `<stream>/<consumer>`, the registry
    key (``<pipeline>.<uid>``) or the Redis key pattern. ``age`` is in seconds; None when the
    store cannot tell.
    """

    kind: Kind
    uid: str
    name: str
    age: float | None
    owner: str | None


def classify(
    resource: Resource,
    live_uids: Collection[str],
    namespaces: Collection[str] | None,
    grace_seconds: float,
) -> Verdict:
    """The verdict for one resource; ``namespaces`` None means this operator is cluster-wide."""
    if not is_job_uid(resource.uid):
        return Verdict.NOT_A_JOB
    if resource.uid in live_uids:
        return Verdict.LIVE
    if namespaces is not None and (resource.owner is None or resource.owner not in namespaces):
        return Verdict.NOT_OURS
    # An unknown age passes only a zero grace: "older than nothing" holds for anything that exists.
    if grace_seconds > 0 and (resource.age is None or resource.age < grace_seconds):
        return Verdict.YOUNG
    return Verdict.ORPHAN


def decide(
    resources: Iterable[Resource],
    live_uids: Collection[str],
    namespaces: Collection[str] | None,
    grace_seconds: float,
) -> list[Resource]:
    """The resources to delete, in observation order."""
    live = frozenset(live_uids)
    watched = None if namespaces is None else frozenset(namespaces)
    return [r for r in resources if classify(r, live, watched, grace_seconds) is Verdict.ORPHAN]


def live_uids(jobs: Iterable[Mapping[str, Any]]) -> set[str]:
    """UIDs of the listed MLJobs that are not terminal (no status yet counts as live).

    A job being deleted is still live: its finalizer owns its cleanup.
    """
    terminal = {p.value for p in TERMINAL_PHASES}
    return {
        str(job["metadata"]["uid"])
        for job in jobs
        if str((job.get("status") or {}).get("phase") or "") not in terminal
    }
