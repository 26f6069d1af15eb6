"""The one check run after every recovery/chaos scenario (issue 6, section 8).

For a finished job:
- every item has exactly one result row and no other row exists (a Cancelled job: at most one
  per item, only items of the job);
- the counts in the MLJob == the Postgres job row == the result rows (a Cancelled job's counts
  freeze at the verdict, so later results may add rows);
- the MLJob phase equals the Postgres phase;
- at most one terminal transition per job in the audit, and none out of a terminal phase;
- nothing left behind: no stream, registry entry or Redis key.
"""

from __future__ import annotations

from typing import Any

from support.env import E2E

TERMINAL = {"Succeeded", "Failed", "Cancelled"}


def transitions(e2e: E2E, uid: str) -> list[tuple[str | None, str, str | None]]:
    with e2e.pg() as conn:
        cur = conn.execute(
            "SELECT from_phase, to_phase, reason FROM mljob_transitions WHERE job_uid = %s ORDER BY id",
            (uid,),
        )
        return [(a, b, c) for a, b, c in cur.fetchall()]


def registered_items(e2e: E2E, uid: str) -> set[str]:
    with e2e.pg() as conn:
        cur = conn.execute("SELECT item_id FROM mljob_items WHERE job_uid = %s", (uid,))
        return {item for (item,) in cur.fetchall()}


def assert_job_invariants(
    e2e: E2E,
    uid: str,
    items: list[str],
    pipeline: str,
    status: dict[str, Any] | None = None,
    deleted: bool = False,
) -> dict[str, str]:
    """Assert the invariants for a finished (or deleted) job; returns its result rows."""
    rows = e2e.result_rows(uid)
    job = e2e.job_row(uid)
    assert job is not None, f"job {uid} has no Postgres row"
    assert job["phase"] in TERMINAL, f"Postgres row not terminal: {job}"
    expected = set(items)
    assert registered_items(e2e, uid) == expected, "the ledger's items are not the job's items"
    if job["phase"] == "Cancelled":
        assert set(rows) <= expected, f"rows for non-items: {sorted(set(rows) - expected)[:10]}"
    else:
        missing, extra = expected - set(rows), set(rows) - expected
        assert not missing and not extra, (
            f"missing rows {sorted(missing)[:10]}, extra rows {sorted(extra)[:10]}"
        )
    failed_rows = sum(1 for outcome in rows.values() if outcome == "failed")
    if job["phase"] == "Cancelled":
        # The counts freeze at the verdict; results still in flight are recorded afterwards (row 10).
        assert job["processed"] <= len(rows) and job["failed"] <= failed_rows, (job, len(rows), failed_rows)
    else:
        assert (job["processed"], job["failed"]) == (len(rows), failed_rows), (job, len(rows), failed_rows)
    if not deleted:
        assert status is not None
        assert status["phase"] == job["phase"], (status["phase"], job["phase"])
        shown = (status.get("processed") or 0, status.get("failed") or 0)
        assert shown == (job["processed"], job["failed"]), (status, job)
    audit = transitions(e2e, uid)
    terminal = [t for t in audit if t[1] in TERMINAL]
    assert len(terminal) == 1, f"expected one terminal transition, got {audit}"
    assert not [t for t in audit if t[0] in TERMINAL], f"a transition out of a terminal phase: {audit}"
    assert e2e.redis_keys(uid) == [], "Redis keys left behind"
    assert e2e.nats_leftovers(uid, pipeline) == {"consumer": False, "registry": False}, "NATS leftovers"
    return rows
