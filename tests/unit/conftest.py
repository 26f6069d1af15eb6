"""Fixtures of the unit tests over the in-memory fakes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mljob import ledger
from mljob.controller import loop as lifecycle
from mljob.controller import observe
from mljob.controller.actions import state as state_action
from mljob.settings import OperatorSettings
from support.fakes import Clock, FakeWorld
from support.jobloop import MAX_RECREATIONS


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    """One clock for every module of the loop that reads `time.time()`."""
    fake = Clock()
    for module in (observe, lifecycle, ledger, state_action):
        monkeypatch.setattr(module, "time", fake)
    yield fake


@pytest.fixture
def world(clock: Clock) -> FakeWorld:
    settings = OperatorSettings(
        reconcile_interval=0.01,
        dispatch_chunk=4,
        max_stream_recreations=MAX_RECREATIONS,
        actor="test-operator",
    )
    return FakeWorld(clock, settings)
