"""Handlers that ship in the image, for checking an installation end to end before a model is
ready: `mljob worker --pipeline smoke --handler mljob.worker.examples:echo`."""

from __future__ import annotations

import asyncio
from typing import Any

from mljob.worker.context import TaskContext


async def echo(task: TaskContext) -> dict[str, Any]:
    """The item back as the result, with the attempt that produced it. The MLJob's
    `params.echoDelaySeconds` (default 0) is slept first, to stand in for a model's latency."""
    delay = float(task.params.get("echoDelaySeconds", 0) or 0)
    if delay > 0:
        await asyncio.sleep(delay)
    return {"item": task.item, "attempt": task.attempt}
