"""`reconcile.next_tick` and `reconcile.is_quiet`: how often a job's loop looks, table-driven."""

from __future__ import annotations

import pytest

from mljob.api.models import Phase
from mljob.core import reconcile
from mljob.core.counts import ItemCounts

pytestmark = pytest.mark.unit

NOW = 1_000_000.0


def snap(**changes: object) -> reconcile.Snapshot:
    base: dict[str, object] = {
        "phase": Phase.RUNNING,
        "cancel": False,
        "failure_threshold": 0.5,
        "dispatched": 10,
        "total": 10,
        "counts": ItemCounts(total=10, pending=4, failed=0),
        "now": NOW,
        "start_time": NOW - 100,
        "stall_timeout_seconds": 600,
    }
    base.update(changes)
    return reconcile.Snapshot(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("quiet", "changes", "expected"),
    [
        (0, {}, 5.0),  # something moved: the base interval
        (1, {}, 10.0),  # doubling per quiet tick
        (3, {}, 40.0),
        (4, {}, 60.0),  # up to the ceiling
        (50, {}, 60.0),  # and no overflow
        (10, {"stall_timeout_seconds": 100}, 25.0),  # a quarter of the stall timeout at most
        (10, {"stall_timeout_seconds": 8}, 5.0),  # but never below the base interval
        (10, {"active_deadline_seconds": 130}, 30.0),  # the deadline is looked at when it passes
        (10, {"active_deadline_seconds": 101}, 5.0),  # passing within a tick: the base interval
        (10, {"active_deadline_seconds": 50}, 5.0),  # passed already (decided this tick)
        (10, {"active_deadline_seconds": 130, "start_time": None}, 60.0),  # not started: no deadline
    ],
)
def test_next_tick(quiet: int, changes: dict[str, object], expected: float) -> None:
    assert reconcile.next_tick(snap(**changes), quiet, base=5.0, ceiling=60.0) == expected


def test_a_ceiling_below_the_base_interval_means_the_base_interval() -> None:
    assert reconcile.next_tick(snap(), 5, base=5.0, ceiling=1.0) == 5.0


@pytest.mark.parametrize(
    ("action", "changed", "quiet"),
    [
        (reconcile.Action.PROGRESS, False, True),
        (reconcile.Action.WAIT_FOR_WORKERS, False, True),
        (reconcile.Action.PROGRESS, True, False),  # counts moved
        (reconcile.Action.DISPATCH, False, False),
        (reconcile.Action.REDISPATCH, False, False),
        (reconcile.Action.FINISH, False, False),
        (reconcile.Action.FAIL_PENDING, False, False),
        (reconcile.Action.REBUILD_STATE, False, False),
        (reconcile.Action.CANCEL, False, False),
    ],
)
def test_is_quiet(action: reconcile.Action, changed: bool, quiet: bool) -> None:
    assert reconcile.is_quiet(reconcile.Plan(action), changed) is quiet


DONE = ItemCounts(total=10, pending=0, failed=0)


@pytest.mark.parametrize(
    ("case", "changes", "changed", "action", "quiet"),
    [
        # Redis shows nothing pending; the ledger had no items last time (StateAvailable=False):
        # the finish is tried again, but as a quiet tick that backs off
        ("finish, ledger empty", {"counts": DONE, "state_unavailable": True}, False, "finish", True),
        (
            "finish, ledger empty, counts moved",
            {"counts": DONE, "state_unavailable": True},
            True,
            "finish",
            False,
        ),
        ("finish, first try", {"counts": DONE}, False, "finish", False),
        (
            "rebuild, nothing to rebuild from",
            {"counts": None, "state_unavailable": True},
            False,
            "rebuild-state",
            True,
        ),
        ("rebuild, first try", {"counts": None}, False, "rebuild-state", False),
        ("progress, state unavailable", {"state_unavailable": True}, False, "progress", True),
        (
            "cancel beats a blocked finish",
            {"counts": DONE, "state_unavailable": True, "cancel": True},
            False,
            "cancel",
            False,
        ),
    ],
)
def test_a_blocked_finish_or_rebuild_is_quiet(
    case: str, changes: dict[str, object], changed: bool, action: str, quiet: bool
) -> None:
    plan = reconcile.decide(snap(**changes))
    assert (plan.action, reconcile.is_quiet(plan, changed)) == (action, quiet), case


def test_a_blocked_finish_backs_off_like_a_quiet_job() -> None:
    s = snap(counts=DONE, state_unavailable=True)
    quiet = 0
    sleeps = []
    for _ in range(6):
        quiet = quiet + 1 if reconcile.is_quiet(reconcile.decide(s), False) else 0
        sleeps.append(reconcile.next_tick(s, quiet, base=5.0, ceiling=60.0))
    assert sleeps == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
