"""`core.index`: the slim copy the scheduler keeps of each MLJob, and which watch events wake it."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from mljob.core import index

pytestmark = pytest.mark.unit


def body(phase: str | None = "Running", **meta: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "processed": 3} if phase else {}
    return {
        "apiVersion": "mljob.dev/v1alpha1",
        "kind": "MLJob",
        "metadata": {
            "namespace": "ml",
            "name": "embed",
            "uid": "u-1",
            "generation": 1,
            "resourceVersion": "10",
            "finalizers": [index.FINALIZER],
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:items": {}}}}] * 20,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x" * 20_000},
            **meta,
        },
        "spec": {
            "pipeline": "embed",
            "items": [f"img-{n:05d}.jpg" for n in range(500)],
            "params": {"model": "clip"},
            "cancel": False,
        },
        "status": status,
    }


def test_a_dispatched_job_keeps_a_few_hundred_bytes_not_its_items_or_managed_fields() -> None:
    full = body("Running")
    slim = index.slim(full)
    assert len(json.dumps(slim)) < 1_000 < 20_000 < len(json.dumps(full))
    assert "items" not in slim["spec"] and "params" not in slim["spec"]
    assert slim["spec"]["pipeline"] == "embed" and slim["status"]["processed"] == 3
    assert set(slim["metadata"]) == {
        "namespace",
        "name",
        "uid",
        "generation",
        "resourceVersion",
        "finalizers",
    }
    assert not index.has_full_spec(slim)


@pytest.mark.parametrize("phase", [None, "Pending", "Dispatching"])
def test_a_job_not_dispatched_yet_keeps_what_dispatch_reads(phase: str | None) -> None:
    slim = index.slim(body(phase))
    assert len(slim["spec"]["items"]) == 500 and slim["spec"]["params"] == {"model": "clip"}
    assert index.has_full_spec(slim)


def test_slim_never_aliases_the_watch_body() -> None:
    full = body("Pending")
    slim = index.slim(full)
    slim["metadata"]["finalizers"] = []
    slim["status"]["phase"] = "Running"
    assert full["metadata"]["finalizers"] == [index.FINALIZER] and full["status"]["phase"] == "Pending"


def edited(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    target = changed
    for key in parents:
        target = target.setdefault(key, {})
    if value is None:
        target.pop(leaf, None)
    else:
        target[leaf] = value
    return changed


BASE = index.slim(body("Running"))


@pytest.mark.parametrize(
    ("after", "wakes"),
    [
        (edited(BASE, "metadata.generation", 2), True),  # spec edited: cancel, TTL, deadline
        (edited(BASE, "metadata.deletionTimestamp", "2026-12-03T00:00:00Z"), True),  # kubectl delete
        (edited(BASE, "metadata.finalizers", []), True),  # someone removed our finalizer
        (edited(BASE, "status.phase", "Succeeded"), True),  # another replica's verdict, or ours
        (edited(BASE, "status.processed", 9), False),  # our own progress write: the loop paces itself
        (edited(BASE, "metadata.resourceVersion", "11"), False),  # any write moves the version
        (edited(BASE, "status.conditions", [{"type": "Stalled", "status": "True"}]), False),
        (BASE, False),
    ],
)
def test_which_watch_events_make_a_job_due_at_once(after: dict[str, Any], wakes: bool) -> None:
    assert index.worth_a_look(BASE, after) is wakes


def test_a_job_new_to_the_index_is_due_at_once() -> None:
    assert index.worth_a_look(None, BASE)


@pytest.mark.parametrize(
    ("finalizers", "deletion", "finalized", "deleting"),
    [
        ([index.FINALIZER], None, True, False),
        (["other.io/keep", index.FINALIZER], "2026-12-03T00:00:00Z", True, True),
        (["other.io/keep"], "2026-12-03T00:00:00Z", False, True),
        (None, None, False, False),
    ],
)
def test_finalizer_and_deletion_marks(
    finalizers: list[str] | None, deletion: str | None, finalized: bool, deleting: bool
) -> None:
    meta: dict[str, Any] = {"finalizers": finalizers} if finalizers is not None else {}
    if deletion:
        meta["deletionTimestamp"] = deletion
    assert index.finalized({"metadata": meta}) is finalized
    assert index.deleting({"metadata": meta}) is deleting
