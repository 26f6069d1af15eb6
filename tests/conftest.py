"""Fixtures of every folder: one real local stack per test session (`stack`), kubectl on it, the
CRD, a namespace per test. Each folder's own are in its conftest.py (integration: Redis by key
prefix, Postgres by schema, NATS; e2e: an operator per module); the classes they hand out are in
tests/support.

`make test` starts the stack and exports its environment; run bare, pytest starts its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from support.stack import CRD_DIR, SERVICE_VARS, Kubectl, StackEnv
from support.waiting import wait_for


@pytest.fixture(scope="session")
def stack() -> Iterator[StackEnv]:
    """The running local stack: the one `make test` started, or a fresh one for this session."""
    from mljob_dev.devstack import stack as devstack

    owned = None
    if all(os.environ.get(v) for v in SERVICE_VARS) and os.environ.get("MLJOB_STACK_DIR"):
        env = dict(os.environ)
    else:
        owned = devstack.up()
        env = owned.env
    yield StackEnv.of(env)
    if owned is not None:
        owned.stop()


@pytest.fixture(scope="session")
def kubectl(stack: StackEnv) -> Kubectl:
    return Kubectl(stack.kubeconfig)


@pytest.fixture(scope="session")
def crd_installed(kubectl: Kubectl) -> None:
    """The committed CRD, applied and Established."""
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/mljobs.mljob.dev")
    # discovery lags Established by a moment
    wait_for(
        lambda: kubectl.run("get", "mljobs", "-A", check=False).returncode == 0,
        30,
        what="the mljobs resource to become servable",
    )


@pytest.fixture
def namespace(kubectl: Kubectl) -> str:
    """A fresh namespace per test (no namespace controller runs, so it is not deleted)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl.run("create", "namespace", name)
    return name
