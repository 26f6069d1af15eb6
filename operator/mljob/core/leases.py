"""Leader election on a coordination.k8s.io/v1 Lease: the decisions, with the clock passed in.

The rules are client-go's (`k8s.io/client-go/tools/leaderelection`), so the operator behaves like
kube-controller-manager and every runbook about those applies:

- the holder renews every retry period; a replica that cannot renew within the renew deadline
  stops leading by itself;
- another replica takes an expired lease over; a lease is expired when more than
  leaseDurationSeconds passed since this replica last saw the record change. That time is read
  on the observer's own (monotonic) clock, as client-go does: renewTime is another machine's
  wall clock, and a follower whose clock runs ahead would take over a live lease;
- a released lease (no holder) is free at once; taking it, or an expired one, counts a transition.

Why two never lead at once: the holder's last successful renewal was sent at `t`; a follower saw
it land after `t`, so it takes over after `t + duration`, while the holder stopped leading at
`t + renew deadline`, earlier (validation keeps deadline < duration). Every write replaces the
object at the resourceVersion read, so of two writers one wins and the other re-reads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime


@dataclass(frozen=True)
class Timing:
    """client-go's three durations (seconds); its defaults are 15, 10, 2."""

    lease_duration: int = 15
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        problem = timing_problem(self.lease_duration, self.renew_deadline, self.retry_period)
        if problem:
            raise ValueError(problem)


def timing_problem(lease_duration: float, renew_deadline: float, retry_period: float) -> str | None:
    """Why these durations cannot keep two leaders apart, or None when they can."""
    if retry_period <= 0:
        return f"the retry period must be positive, got {retry_period}"
    if not renew_deadline < lease_duration:
        return (
            f"the renew deadline ({renew_deadline} s) must be shorter than the lease duration "
            f"({lease_duration} s): a leader must stop before another may take over"
        )
    if not retry_period < renew_deadline:
        return (
            f"the retry period ({retry_period} s) must be shorter than the renew deadline "
            f"({renew_deadline} s): a leader must get more than one try to renew"
        )
    return None


@dataclass(frozen=True)
class LeaseRecord:
    """The spec of a Lease: who holds it, since when, for how long."""

    holder: str | None
    duration_seconds: int | None
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    transitions: int = 0


@dataclass(frozen=True)
class Observed:
    """A record as this replica saw it, and when (its monotonic clock) it last saw it change."""

    record: LeaseRecord
    since: float


def observe(previous: Observed | None, record: LeaseRecord, now: float) -> Observed:
    """The new observation: the same record keeps its time, a changed one starts now."""
    if previous is not None and previous.record == record:
        return previous
    return Observed(record, now)


class Action(enum.Enum):
    CREATE = "create"  # there is no lease: create it holding it
    RENEW = "renew"  # I hold it: write a fresh renewTime
    TAKE_OVER = "take_over"  # released or expired: write my name, transitions + 1
    FOLLOW = "follow"  # someone else holds a live lease: wait


def expired(observed: Observed, now: float, default_duration: int) -> bool:
    """Whether the holder had more than its lease duration to renew and did not (client-go:
    observedTime + leaseDurationSeconds is before now)."""
    duration = observed.record.duration_seconds or default_duration
    return now > observed.since + duration


def decide(observed: Observed | None, me: str, now: float, timing: Timing) -> Action:
    """What to do on this try, given the lease as read (None: there is none)."""
    if observed is None:
        return Action.CREATE
    holder = observed.record.holder
    if holder == me:
        return Action.RENEW
    if not holder or expired(observed, now, timing.lease_duration):
        return Action.TAKE_OVER
    return Action.FOLLOW


def to_write(
    action: Action, current: LeaseRecord | None, me: str, stamp: datetime, timing: Timing
) -> LeaseRecord:
    """The record to write for CREATE, RENEW or TAKE_OVER (`stamp`: wall-clock now, for humans
    and for other tools reading the Lease)."""
    if action is Action.FOLLOW:
        raise ValueError("a follower writes nothing")
    if action is Action.CREATE or current is None:
        return LeaseRecord(me, timing.lease_duration, stamp, stamp, 0)
    if action is Action.RENEW:
        return replace(
            current,
            duration_seconds=timing.lease_duration,
            acquire_time=current.acquire_time or stamp,
            renew_time=stamp,
        )
    return LeaseRecord(me, timing.lease_duration, stamp, stamp, current.transitions + 1)


def released(current: LeaseRecord, stamp: datetime) -> LeaseRecord:
    """What a leader writes on a clean stop (client-go's ReleaseOnCancel): no holder, so the
    others take over at their next try instead of waiting for the lease to expire."""
    return replace(current, holder=None, duration_seconds=1, renew_time=stamp)


def still_leading(renewed_at: float | None, now: float, timing: Timing) -> bool:
    """A leader leads until the renew deadline after its last successful renewal (`renewed_at`:
    when that request was sent, on the monotonic clock) and not a moment longer."""
    return renewed_at is not None and now < renewed_at + timing.renew_deadline


def step_down_at(renewed_at: float, timing: Timing) -> float:
    """When a leader that renewed at `renewed_at` must stop leading unless it renews again."""
    return renewed_at + timing.renew_deadline
