"""The clustered stack's chaos commands as a user types them: `mljob dev stack leaders`, `kill
NODE`, `start NODE` (docs/operations.md, "Faults on the clustered local stack"). Each kill of a
leader hands its leadership to another node, and the node started again rejoins as a follower."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from support.stack import ROOT, StackEnv
from support.waiting import wait_for

pytestmark = pytest.mark.ha
MLJOB = str(ROOT / ".venv" / "bin" / "mljob")


def _stack(stack: StackEnv, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [MLJOB, "dev", "stack", *args, "--dir", stack.directory], capture_output=True, text=True, timeout=180
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _leaders(stack: StackEnv) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(_stack(stack, "leaders").stdout)
    return found


@pytest.mark.timeout(600)
def test_each_leader_killed_by_name_hands_over_and_comes_back_as_a_follower(stack: StackEnv) -> None:
    before = _leaders(stack)
    assert before["nats"]["meta"] in ("nats-1", "nats-2", "nats-3"), before
    assert len(before["redis"]["primaries"]) == 3, before
    assert before["postgres"]["primary"] in ("patroni-1", "patroni-2"), before

    meta = before["nats"]["meta"]
    _stack(stack, "kill", meta)
    wait_for(lambda: _leaders(stack)["nats"]["meta"] not in (None, meta), 60, what="another NATS meta leader")
    _stack(stack, "start", meta)
    assert _leaders(stack)["nats"]["meta"] != meta

    primary = before["redis"]["primaries"][0]
    _stack(stack, "kill", primary)
    promoted = "the killed primary's replica promoted"
    wait_for(lambda: len(_leaders(stack)["redis"]["primaries"]) == 3, 60, what=promoted)
    _stack(stack, "start", primary)
    assert primary not in _leaders(stack)["redis"]["primaries"]  # back as a replica

    pg = before["postgres"]["primary"]
    _stack(stack, "kill", pg)
    wait_for(lambda: _leaders(stack)["postgres"]["primary"] not in (None, pg), 90, what="a standby promoted")
    _stack(stack, "start", pg)
    time.sleep(1)
    assert _leaders(stack)["postgres"]["primary"] not in (None, pg)


def test_a_name_that_is_no_node_is_refused_naming_the_nodes(stack: StackEnv) -> None:
    proc = _stack(stack, "kill", "nats-9", check=False)
    assert proc.returncode == 1
    assert "no clustered node 'nats-9'" in proc.stderr and "redis-cluster-6" in proc.stderr
