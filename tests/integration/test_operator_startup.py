"""An unreachable dependency at start-up: one clear line naming it and where, retries, no stack traces.

One line per distinct cause (the policy every process shares, adapters/bootstrap.py): an
operator retrying the same refused port for minutes does not fill its log.
"""

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
        ("MLJOB_NATS_URL", "nats://127.0.0.1:{port}", "cannot reach NATS at 127.0.0.1:{port}"),
        ("MLJOB_REDIS_URL", "redis://127.0.0.1:{port}/0", "cannot reach Redis at 127.0.0.1:{port}"),
        (
            "MLJOB_POSTGRES_DSN",
            "postgresql://postgres@127.0.0.1:{port}/mljob",
            "cannot reach Postgres at 127.0.0.1:{port}",
        ),
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
        wait_for(lambda: expected in proc.log_tail(200), 30, what=f"a line naming {expected!r}")
        time.sleep(4)  # several more attempts (backing off from 0.5 s), the same cause
        assert proc.alive(), proc.log_tail()
        log = proc.log_tail(400)
        lines = [line for line in log.splitlines() if expected in line]
        assert len(lines) == 1, log
        assert "); retrying" in lines[0], lines[0]
        assert "Traceback" not in log, log
    finally:
        proc.stop()
