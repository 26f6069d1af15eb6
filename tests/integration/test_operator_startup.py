"""An unreachable dependency at start-up: one clear line naming it, retries, no stack traces."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mljob_dev.devstack.stack import free_port
from support.harness import Proc, child_env, mljob_cmd
from support.stack import Kubectl, StackEnv
from support.waiting import wait_for


@pytest.mark.parametrize(
    ("variable", "template", "needle"),
    [
        ("MLJOB_NATS_URL", "nats://127.0.0.1:{port}", "cannot reach NATS at nats://127.0.0.1:{port}"),
        ("MLJOB_REDIS_URL", "redis://127.0.0.1:{port}/0", "cannot reach Redis at redis://127.0.0.1:{port}/0"),
        ("MLJOB_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:{port}/mljob", "cannot reach Postgres"),
    ],
)
def test_unreachable_dependency_is_named_and_retried(
    stack: StackEnv,
    kubectl: Kubectl,
    crd_installed: None,
    namespace: str,
    tmp_path: Path,
    variable: str,
    template: str,
    needle: str,
) -> None:
    port = free_port()  # nothing listens here
    env = child_env(
        stack.as_env(),
        MLJOB_POSTGRES_SCHEMA="startup_probe",
        MLJOB_REDIS_PREFIX="startup-probe",
        **{variable: template.format(port=port)},
    )
    proc = Proc("operator", mljob_cmd("operator", "--namespace", namespace), env, tmp_path)
    try:
        expected = needle.format(port=port)
        wait_for(
            lambda: proc.log_tail(200).count(expected) >= 2, 30, what=f"two retries logging {expected!r}"
        )
        time.sleep(1)
        assert proc.alive(), proc.log_tail()
        log = proc.log_tail(400)
        assert "Traceback" not in log, log
        assert "retrying in" in log
    finally:
        proc.stop()
