"""The phase state machine, table-driven."""

from __future__ import annotations

import pytest

from mljob.api.models import Phase
from mljob.core.phases import can_transition, finalizable_from, is_terminal

pytestmark = pytest.mark.unit

P = Phase
CASES = [
    (None, P.PENDING, True),
    (P.PENDING, P.DISPATCHING, True),
    (P.DISPATCHING, P.RUNNING, True),
    (P.RUNNING, P.SUCCEEDED, True),
    (P.RUNNING, P.FAILED, True),
    (P.RUNNING, P.CANCELING, True),
    (P.CANCELING, P.CANCELLED, True),
    (P.CANCELING, P.SUCCEEDED, False),
    (P.CANCELING, P.RUNNING, False),
    (P.RUNNING, P.PENDING, False),
    (P.SUCCEEDED, P.RUNNING, False),
    (P.SUCCEEDED, P.FAILED, False),
    (P.FAILED, P.SUCCEEDED, False),
    (P.CANCELLED, P.SUCCEEDED, False),
    (P.SUCCEEDED, P.SUCCEEDED, True),
]


@pytest.mark.parametrize(("current", "target", "allowed"), CASES)
def test_transition_table(current: Phase | None, target: Phase, allowed: bool) -> None:
    assert can_transition(current, target) is allowed


def test_terminal_phases_are_absorbing() -> None:
    for phase in P:
        if is_terminal(phase):
            assert [t for t in P if can_transition(phase, t)] == [phase]


def test_finalizable_sets() -> None:
    assert P.CANCELING not in finalizable_from(P.SUCCEEDED)
    assert P.CANCELING in finalizable_from(P.CANCELLED)
    assert not any(is_terminal(p) for p in finalizable_from(P.FAILED))
