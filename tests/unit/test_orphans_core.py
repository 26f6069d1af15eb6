"""The orphan decision (failure-modes row 13), table-driven: pure, no services."""

from __future__ import annotations

import pytest

from mljob.core.orphans import Kind, Resource, Verdict, classify, decide, is_job_uid, live_uids

pytestmark = pytest.mark.unit

LIVE = "11111111-1111-4111-8111-111111111111"
GONE = "22222222-2222-4222-8222-222222222222"
OTHER = "33333333-3333-4333-8333-333333333333"


def res(uid: str = GONE, age: float | None = 1000.0, owner: str | None = "ns-a", kind: Kind = Kind.TASKS):
    return Resource(kind=kind, uid=uid, name=f"{kind}-{uid}", age=age, owner=owner)


CASES = [
    # (resource, watched namespaces, grace, verdict, why)
    (res(LIVE), ["ns-a"], 300, Verdict.LIVE, "a live job's resource is never removed"),
    (res(LIVE, age=10**6, owner=None), None, 0, Verdict.LIVE, "live wins over age and ownership"),
    (res(GONE), ["ns-a"], 300, Verdict.ORPHAN, "old, ours, no live job"),
    (res(GONE, age=299.0), ["ns-a"], 300, Verdict.YOUNG, "younger than the grace period"),
    (res(GONE, age=300.0), ["ns-a"], 300, Verdict.ORPHAN, "exactly the grace period old"),
    (res(GONE, age=None), ["ns-a"], 300, Verdict.YOUNG, "unknown age does not pass a grace period"),
    (res(GONE, age=None), ["ns-a"], 0, Verdict.ORPHAN, "unknown age passes a zero grace"),
    (res(GONE, age=0.0), ["ns-a"], 0, Verdict.ORPHAN, "zero grace removes brand-new orphans"),
    (res(GONE, owner="ns-b"), ["ns-a"], 300, Verdict.NOT_OURS, "another namespace's resource"),
    (res(GONE, owner=None), ["ns-a"], 300, Verdict.NOT_OURS, "no known owner: namespaced keeps it"),
    (res(GONE, owner=None), None, 300, Verdict.ORPHAN, "no known owner: cluster-wide removes it"),
    (res(GONE, owner="ns-b"), None, 300, Verdict.ORPHAN, "cluster-wide sees every namespace"),
    (res(GONE, owner="ns-b"), ["ns-a", "ns-b"], 0, Verdict.ORPHAN, "any watched namespace"),
    (res(GONE, owner="ns-a"), [], 0, Verdict.NOT_OURS, "an empty watch list owns nothing"),
    (res("RESULTS", owner=None), None, 0, Verdict.NOT_A_JOB, "MLJOB_RESULTS is never a job stream"),
    (res("ADVISORIES", owner=None), None, 0, Verdict.NOT_A_JOB, "neither is MLJOB_ADVISORIES"),
    (res("ABCDEF12-2222-4222-8222-222222222222"), None, 0, Verdict.NOT_A_JOB, "UIDs are lower-case"),
    (res(GONE, kind=Kind.REDIS), ["ns-a"], 300, Verdict.ORPHAN, "Redis keys follow the same rule"),
    (res(GONE, kind=Kind.REGISTRY, owner="ns-b"), ["ns-a"], 0, Verdict.NOT_OURS, "registry: same"),
]


@pytest.mark.parametrize(("resource", "watched", "grace", "verdict", "why"), CASES)
def test_classify(
    resource: Resource, watched: list[str] | None, grace: float, verdict: Verdict, why: str
) -> None:
    assert classify(resource, {LIVE}, watched, grace) is verdict, why


def test_decide_returns_only_orphans_in_observation_order() -> None:
    resources = [
        res(OTHER, kind=Kind.REDIS),
        res(LIVE),
        res(GONE, kind=Kind.REGISTRY),
        res(GONE, age=5.0),
        res(GONE, owner="ns-b"),
        res(GONE),
    ]
    assert decide(resources, {LIVE}, ["ns-a"], 60) == [resources[0], resources[2], resources[5]]


def test_decide_with_an_empty_listing_removes_every_old_owned_resource() -> None:
    """Why the caller must never pass a failed or partial listing: it would read as "no jobs"."""
    resources = [res(LIVE), res(GONE)]
    assert decide(resources, set(), ["ns-a"], 0) == resources


@pytest.mark.parametrize(
    ("phase", "live"),
    [
        (None, True),
        ("Pending", True),
        ("Dispatching", True),
        ("Running", True),
        ("Canceling", True),
        ("Succeeded", False),
        ("Failed", False),
        ("Cancelled", False),
    ],
)
def test_live_uids_by_phase(phase: str | None, live: bool) -> None:
    job: dict[str, object] = {"metadata": {"uid": GONE}}
    if phase is not None:
        job["status"] = {"phase": phase}
    assert (GONE in live_uids([job])) is live


def test_live_uids_counts_a_job_being_deleted_as_live() -> None:
    job = {"metadata": {"uid": LIVE, "deletionTimestamp": "2024-01-01T00:00:00Z"}, "status": {}}
    assert live_uids([job]) == {LIVE}


@pytest.mark.parametrize(
    ("text", "ok"),
    [(LIVE, True), ("RESULTS", False), ("", False), (LIVE + "x", False), ("job-1", False)],
)
def test_is_job_uid(text: str, ok: bool) -> None:
    assert is_job_uid(text) is ok
