"""`core.schedule.DueQueue`: the one ordering of every MLJob's next look (pure, clock passed in)."""

from __future__ import annotations

import random

import pytest

from mljob.core.schedule import COMPACT_FACTOR, DueQueue

pytestmark = pytest.mark.unit


def queue(**due: float) -> DueQueue[str]:
    q: DueQueue[str] = DueQueue()
    for key, at in due.items():
        q.schedule(key, at)
    return q


@pytest.mark.parametrize(
    ("due", "now", "limit", "popped", "left"),
    [
        ({"a": 1, "b": 2, "c": 3}, 2.5, 10, ["a", "b"], {"c"}),  # earliest first, only what is due
        ({"a": 1, "b": 2, "c": 3}, 10, 2, ["a", "b"], {"c"}),  # at most `limit` (free workers)
        ({"a": 5}, 4.999, 10, [], {"a"}),  # not yet due
        ({"a": 5}, 5, 10, ["a"], set()),  # due exactly at its time
        ({"x": 1, "y": 1, "z": 1}, 1, 10, ["x", "y", "z"], set()),  # ties in the order scheduled
        ({}, 100, 10, [], set()),
    ],
)
def test_pop_due_takes_what_is_due_earliest_first(
    due: dict[str, float], now: float, limit: int, popped: list[str], left: set[str]
) -> None:
    q = queue(**due)
    assert q.pop_due(now, limit) == popped
    assert set(q) == left


@pytest.mark.parametrize(
    ("scheduled", "woken_at", "expected"),
    [
        (10.0, 3.0, 3.0),  # a wake-up brings a later look forward to now
        (2.0, 3.0, 2.0),  # and never pushes an earlier one back
        (None, 3.0, 3.0),  # a key with no look scheduled (finished, no TTL) is due now
    ],
)
def test_wake_only_brings_a_job_forward(scheduled: float | None, woken_at: float, expected: float) -> None:
    q: DueQueue[str] = DueQueue()
    if scheduled is not None:
        q.schedule("job", scheduled)
    q.wake("job", woken_at)
    assert q.due_at("job") == expected
    assert q.next_due() == expected


def test_schedule_replaces_the_due_time_both_ways() -> None:
    q = queue(a=5)
    q.schedule("a", 9)  # the loop's own pacing may push its next look back
    assert q.pop_due(8, 10) == [] and q.due_at("a") == 9
    q.schedule("a", 1)
    assert q.pop_due(1, 10) == ["a"]
    assert q.pop_due(100, 10) == [], "a superseded entry never pops a key twice"


def test_removed_keys_never_pop_and_next_due_skips_them() -> None:
    q = queue(a=1, b=2)
    q.remove("a")
    assert q.next_due() == 2
    assert q.pop_due(10, 10) == ["b"]
    assert len(q) == 0 and q.next_due() is None


def test_many_wake_ups_of_one_busy_job_keep_the_heap_bounded() -> None:
    q = queue(idle=1_000)
    for n in range(10_000):  # a result every moment: the same job woken over and over
        q.schedule("busy", 500 - n * 0.01)
    assert len(q._heap) <= COMPACT_FACTOR * 16 + 1
    assert q.pop_due(1_000, 10) == ["busy", "idle"]


def test_against_a_plain_model_under_random_operations() -> None:
    """Whatever the mix of schedule, wake, remove and pop: the same keys, in the same order, as a
    dict sorted on every pop."""
    rng = random.Random(14)
    q: DueQueue[int] = DueQueue()
    model: dict[int, tuple[float, int]] = {}
    order = 0
    for _ in range(5_000):
        key, at, op = rng.randrange(50), rng.uniform(0, 100), rng.random()
        if op < 0.4:
            q.schedule(key, at)
            if model.get(key, (None,))[0] != at:
                order += 1
                model[key] = (at, order)
        elif op < 0.7:
            q.wake(key, at)
            if key not in model or model[key][0] > at:
                order += 1
                model[key] = (at, order)
        elif op < 0.8:
            q.remove(key)
            model.pop(key, None)
        else:
            now, limit = rng.uniform(0, 100), rng.randrange(1, 8)
            expected = sorted((v, k) for k, v in model.items() if v[0] <= now)[:limit]
            assert q.pop_due(now, limit) == [k for _, k in expected]
            for _, k in expected:
                del model[k]
        assert len(q) == len(model)
