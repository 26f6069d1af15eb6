"""Fixtures of the clustered stack's fault tests (`make test-ha`; `make test` leaves them out):
one clustered stack per session (`mljob dev stack up --ha`, or the one `MLJOB_STACK_HA=1`
says is exported), and per test module two operator replicas, two collectors and the CRD."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.env import make_e2e
from support.ha import HA
from support.stack import CRD_DIR, SERVICE_VARS, Kubectl, StackEnv
from support.waiting import wait_for


@pytest.fixture(scope="session")
def stack() -> Iterator[StackEnv]:
    """The clustered stack: the exported one when it says it is clustered, else a new one."""
    from mljob_dev.devstack import stack as devstack

    owned = None
    exported = all(os.environ.get(v) for v in SERVICE_VARS) and os.environ.get("MLJOB_STACK_HA") == "1"
    if exported:
        env = dict(os.environ)
    else:
        owned = devstack.up(ha=True)
        env = owned.env
    yield StackEnv.of(env)
    if owned is not None:
        owned.stop()


@pytest.fixture(scope="session")
def kubectl(stack: StackEnv) -> Kubectl:
    return Kubectl(stack.kubeconfig)


@pytest.fixture(scope="session")
def crd_installed(kubectl: Kubectl) -> None:
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/mljobs.mljob.dev")
    wait_for(
        lambda: kubectl.run("get", "mljobs", "-A", check=False).returncode == 0,
        30,
        what="the mljobs resource to become servable",
    )


@pytest.fixture
def ha(
    stack: StackEnv, kubectl: Kubectl, crd_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HA]:
    """Per test: a namespace, two operator replicas (leader election, no in-process collector)
    and two external collectors; the test starts its workers."""
    base = make_e2e(stack, kubectl, Path(tmp_path_factory.mktemp("ha")))
    env = next(base)
    fields = ("stack", "kubectl", "namespace", "schema", "prefix", "log_dir")
    cluster = HA(**{f: getattr(env, f) for f in fields})
    cluster.start_operators(2)
    cluster.start_collectors(2)
    try:
        yield cluster
    finally:
        cluster.stop_all()
        env.procs = []
        next(base, None)
