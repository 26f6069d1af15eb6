"""Leader election decisions (mljob.core.leases), table-driven: client-go's rules, a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mljob.core.leases import (
    Action,
    LeaseRecord,
    Observed,
    Timing,
    decide,
    expired,
    observe,
    released,
    still_leading,
    timing_problem,
    to_write,
)

pytestmark = pytest.mark.unit

T = Timing(lease_duration=15, renew_deadline=10, retry_period=2)
STAMP = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
EARLIER = datetime(2030, 1, 2, 3, 0, 0, tzinfo=UTC)


def held(holder: str | None, duration: int | None = 15, transitions: int = 4) -> LeaseRecord:
    return LeaseRecord(holder, duration, EARLIER, EARLIER, transitions)


@pytest.mark.parametrize(
    ("observed", "now", "action"),
    [
        # no lease at all: create it
        (None, 100.0, Action.CREATE),
        # my own lease: renew it, even when it looks expired (no one else wrote since)
        (Observed(held("me"), since=100.0), 101.0, Action.RENEW),
        (Observed(held("me"), since=100.0), 500.0, Action.RENEW),
        # another holder, seen renewing within its duration: follow
        (Observed(held("other"), since=100.0), 100.0, Action.FOLLOW),
        (Observed(held("other"), since=100.0), 115.0, Action.FOLLOW),  # exactly at expiry: still live
        # not renewed for longer than its duration: take it over
        (Observed(held("other"), since=100.0), 115.001, Action.TAKE_OVER),
        # the holder's own duration counts, not mine
        (Observed(held("other", duration=60), since=100.0), 130.0, Action.FOLLOW),
        (Observed(held("other", duration=60), since=100.0), 160.5, Action.TAKE_OVER),
        (Observed(held("other", duration=None), since=100.0), 115.5, Action.TAKE_OVER),
        # released (no holder, or an empty one): free at once
        (Observed(held(None, duration=1), since=100.0), 100.0, Action.TAKE_OVER),
        (Observed(held("", duration=1), since=100.0), 100.0, Action.TAKE_OVER),
    ],
)
def test_decide(observed: Observed | None, now: float, action: Action) -> None:
    assert decide(observed, "me", now, T) is action


def test_expiry_is_timed_from_when_this_replica_saw_the_record_change_not_its_renew_time() -> None:
    """renewTime is the holder's wall clock: a follower whose clock runs an hour ahead would
    take a live lease over at once. client-go times it from its own observation."""
    record = LeaseRecord("other", 15, EARLIER, datetime(1999, 1, 1, tzinfo=UTC), 0)
    first = observe(None, record, now=1000.0)
    assert first.since == 1000.0
    assert not expired(first, 1010.0, 15)
    # the same record read again keeps its time; a renewal (a new renewTime) restarts it
    assert observe(first, record, now=1014.0) is first
    assert expired(observe(first, record, now=1016.0), 1016.0, 15)
    renewed = LeaseRecord("other", 15, EARLIER, STAMP, 0)
    assert observe(first, renewed, now=1016.0).since == 1016.0


@pytest.mark.parametrize(
    ("action", "current", "expected"),
    [
        (Action.CREATE, None, LeaseRecord("me", 15, STAMP, STAMP, 0)),
        # renew keeps acquireTime and transitions
        (Action.RENEW, held("me", transitions=4), LeaseRecord("me", 15, EARLIER, STAMP, 4)),
        # take over: a new acquireTime and one more transition (expired, or released)
        (Action.TAKE_OVER, held("other", transitions=4), LeaseRecord("me", 15, STAMP, STAMP, 5)),
        (Action.TAKE_OVER, held(None, duration=1, transitions=0), LeaseRecord("me", 15, STAMP, STAMP, 1)),
    ],
)
def test_what_is_written(action: Action, current: LeaseRecord | None, expected: LeaseRecord) -> None:
    assert to_write(action, current, "me", STAMP, T) == expected


def test_a_follower_writes_nothing() -> None:
    with pytest.raises(ValueError, match="writes nothing"):
        to_write(Action.FOLLOW, held("other"), "me", STAMP, T)


def test_release_clears_the_holder_so_a_standby_takes_over_at_its_next_try() -> None:
    gone = released(held("me", transitions=4), STAMP)
    assert (gone.holder, gone.renew_time, gone.transitions) == (None, STAMP, 4)
    assert decide(Observed(gone, since=100.0), "standby", 100.0, T) is Action.TAKE_OVER


@pytest.mark.parametrize(
    ("renewed_at", "now", "leading"),
    [
        (None, 0.0, False),  # never renewed
        (100.0, 100.0, True),
        (100.0, 109.999, True),
        (100.0, 110.0, False),  # the renew deadline after the last renewal sent: step down
        (100.0, 200.0, False),
    ],
)
def test_a_leader_steps_down_at_the_renew_deadline(
    renewed_at: float | None, now: float, leading: bool
) -> None:
    assert still_leading(renewed_at, now, T) is leading


def test_a_hung_leader_steps_down_before_any_standby_may_take_over() -> None:
    """The leader's last renewal was sent at 100 and landed (seen by a standby) no earlier."""
    sent, seen = 100.0, 100.3
    observed = Observed(held("leader"), since=seen)
    step_down = next(t / 100 for t in range(10000, 20000) if not still_leading(sent, t / 100, T))
    take_over = next(
        t / 100 for t in range(10000, 20000) if decide(observed, "standby", t / 100, T) is Action.TAKE_OVER
    )
    assert step_down == 110.0 and take_over == 115.31
    assert step_down < take_over


@pytest.mark.parametrize(
    ("durations", "problem"),
    [
        ((15, 10, 2), None),
        ((3, 2, 0.5), None),
        ((15, 15, 2), "the renew deadline (15 s) must be shorter than the lease duration (15 s)"),
        ((15, 20, 2), "the renew deadline (20 s) must be shorter than the lease duration (15 s)"),
        ((15, 10, 10), "the retry period (10 s) must be shorter than the renew deadline (10 s)"),
        ((15, 10, 0), "the retry period must be positive"),
    ],
)
def test_timing_validation(durations: tuple[int, float, float], problem: str | None) -> None:
    found = timing_problem(*durations)
    if problem is None:
        assert found is None
        Timing(*durations)
    else:
        assert found is not None and found.startswith(problem)
        with pytest.raises(ValueError, match=problem.split(" (")[0]):
            Timing(*durations)
