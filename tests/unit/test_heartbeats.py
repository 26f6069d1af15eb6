"""The operator's map of worker heartbeats stays bounded (`mljob.adapters.services.Heartbeats`).

Heartbeats arrive for every job on the NATS account, other installations' included; only the
jobs this operator runs a loop for are kept, and an entry no decision can use any more expires.
"""

from __future__ import annotations

import pytest

from mljob.adapters.services import HEARTBEAT_EXPIRY_INTERVAL_SECONDS, Heartbeats
from mljob.api.models import MAX_STALL_TIMEOUT_SECONDS

pytestmark = pytest.mark.unit

T0 = 1_000_000.0
HORIZON = float(MAX_STALL_TIMEOUT_SECONDS)


@pytest.mark.parametrize(
    ("case", "heard", "managed_after", "now", "kept"),
    [
        ("a managed job's heartbeat is kept", [("mine", T0)], {"mine"}, T0, {"mine": T0}),
        ("another installation's job is not kept", [("theirs", T0)], {"mine"}, T0, {}),
        ("the latest heartbeat counts", [("mine", T0), ("mine", T0 + 5)], {"mine"}, T0 + 5, {"mine": T0 + 5}),
        (
            "a job whose loop ended is dropped at the next expiry",
            [("gone", T0)],
            set(),
            T0 + HEARTBEAT_EXPIRY_INTERVAL_SECONDS,
            {},
        ),
        (
            "older than the longest stall timeout: expired",
            [("mine", T0)],
            {"mine"},
            T0 + HORIZON,
            {},
        ),
        (
            "younger than the longest stall timeout: kept",
            [("mine", T0)],
            {"mine"},
            T0 + HORIZON - 1,
            {"mine": T0},
        ),
    ],
)
def test_what_the_map_keeps(
    case: str,
    heard: list[tuple[str, float]],
    managed_after: set[str],
    now: float,
    kept: dict[str, float],
) -> None:
    managed = {"mine", "gone"}
    beats = Heartbeats(managed=managed)
    for uid, at in heard:
        beats.record(uid, at)
    managed.intersection_update(managed_after)
    beats.record("theirs", now)  # any heartbeat later on lets the map expire what it holds
    assert beats.seen == kept, case


def test_a_flood_of_foreign_heartbeats_leaves_the_map_as_it_was() -> None:
    beats = Heartbeats(managed={"mine"})
    beats.record("mine", T0)
    for n in range(10_000):
        beats.record(f"other-{n}", T0 + n / 100)
    assert beats.seen == {"mine": T0}
    assert beats.get("mine") == T0 and beats.get("other-1") is None


def test_expiry_runs_at_most_once_per_interval() -> None:
    managed = {"a"}
    beats = Heartbeats(managed=managed)
    beats.record("a", T0)  # the first heartbeat runs an expiry
    managed.clear()
    beats.record("b", T0 + HEARTBEAT_EXPIRY_INTERVAL_SECONDS - 1)
    assert beats.seen == {"a": T0}  # not yet: no full scan per heartbeat
    beats.record("b", T0 + HEARTBEAT_EXPIRY_INTERVAL_SECONDS)
    assert beats.seen == {}


def test_forget() -> None:
    beats = Heartbeats(managed={"a"})
    beats.record("a", T0)
    beats.forget("a")
    beats.forget("a")
    assert beats.get("a") is None
