"""Handlers for tests/integration/test_worker.py: `--handler support.workers.handlers:<name>`,
with tests/ on PYTHONPATH."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from mljob.protocol import MAX_RESULT_BYTES
from mljob.worker import PermanentError, TaskContext

SLEEP_ENV = "TEST_HANDLER_SLEEP"


def mostly_ok(ctx: TaskContext) -> dict[str, Any]:
    """Plain (threaded) handler; items whose id ends in 7 fail permanently."""
    if ctx.item_id.endswith("7"):
        raise PermanentError(f"item {ctx.item_id} is cursed")
    return {"double": ctx.item["n"] * 2, "attempt": ctx.attempt, "params": ctx.params, "job": ctx.job.name}


async def quick(ctx: TaskContext) -> dict[str, Any]:
    """Async handler sleeping $TEST_HANDLER_SLEEP seconds (default 5 ms)."""
    await asyncio.sleep(float(os.environ.get(SLEEP_ENV, "0.005")))
    return {"n": ctx.item.get("n")}


def sleepy(ctx: TaskContext) -> dict[str, Any]:
    """Plain handler blocking its thread for $TEST_HANDLER_SLEEP seconds (default 30)."""
    time.sleep(float(os.environ.get(SLEEP_ENV, "30")))
    return {"slept": True}


def tricky(ctx: TaskContext) -> Any:
    """`kind` big: a result over the size limit; flaky: a transient error every time."""
    kind = ctx.item.get("kind")
    if kind == "big":
        return {"blob": "x" * (MAX_RESULT_BYTES + 100)}
    if kind == "flaky":
        raise RuntimeError("flaky backend")
    return {"ok": True, "attempt": ctx.attempt}
