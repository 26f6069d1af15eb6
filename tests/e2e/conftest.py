"""Fixtures of the end-to-end tests: one operator per test module on the shared stack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.env import E2E, make_e2e
from support.stack import Kubectl, StackEnv


@pytest.fixture(scope="module")
def e2e(
    stack: StackEnv, kubectl: Kubectl, crd_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[E2E]:
    """One operator per test module, watching its own namespace (see support.env)."""
    env_iter = make_e2e(stack, kubectl, Path(tmp_path_factory.mktemp("e2e")))
    env = next(env_iter)
    env.start_operator()
    yield env
    next(env_iter, None)
