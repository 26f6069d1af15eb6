"""The running operator sweeps planted orphans and leaves a live job alone (row 13, issue 6 §7).

This module starts its own operator with a 2 s sweep interval and no grace period.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.env import E2E, make_e2e
from support.harness import mljob_cmd
from support.stack import Kubectl, StackEnv
from support.waiting import wait_for

PIPELINE = "sweep"


@pytest.fixture(scope="module")
def sweeping(
    stack: StackEnv, kubectl: Kubectl, crd_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[E2E]:
    env_iter = make_e2e(stack, kubectl, Path(tmp_path_factory.mktemp("e2e-sweep")))
    env = next(env_iter)
    env.start_operator(MLJOB_ORPHAN_SWEEP_INTERVAL="2", MLJOB_ORPHAN_GRACE_SECONDS="0")
    yield env
    next(env_iter, None)


def leftovers(env: E2E, uid: str) -> dict[str, bool]:
    return {**env.nats_leftovers(uid, PIPELINE), "redis": bool(env.redis_keys(uid))}


def test_operator_sweeps_planted_orphans_and_keeps_a_live_job(sweeping: E2E) -> None:
    env = sweeping
    # A live job with no worker: dispatched, Running, its stream, entry and keys in place.
    live = env.apply("live", PIPELINE, [f"i{n}" for n in range(5)])
    env.wait_phase("live", {"Running"})
    assert leftovers(env, live) == {"consumer": True, "registry": True, "redis": True}

    planted = subprocess.run(
        mljob_cmd(
            "chaos", "plant-orphans", "--count=3", f"--pipeline={PIPELINE}", f"--namespace={env.namespace}"
        ),
        env=env.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    orphans = planted.stdout.split()
    assert len(orphans) == 3, planted.stdout + planted.stderr
    # No check that they exist now: the operator sweeps every 2 s and may already have taken
    # them. The removal lines in its log below prove each one existed and was removed by it.

    def all_gone() -> bool:
        return all(not any(leftovers(env, uid).values()) for uid in orphans)

    try:
        wait_for(all_gone, 60, interval=1.0, what="the operator to sweep the planted orphans")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{env.logs()}") from err

    assert env.operator is not None
    log = env.operator.log_path.read_text(errors="replace")
    for uid in orphans:
        removed = [line for line in log.splitlines() if "orphan sweep: removed" in line and uid in line]
        assert len(removed) == 3, f"expected stream, registry and Redis lines for {uid}:\n{log[-4000:]}"
    assert leftovers(env, live) == {"consumer": True, "registry": True, "redis": True}
    assert env.status("live")["phase"] == "Running"
