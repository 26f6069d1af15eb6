"""Handlers of the mljob benchmarks' workers (`mljob worker --handler bench.handlers:noop`).

Plain functions, as a user writes them: the worker runs each call in a thread of its own.
"""

from __future__ import annotations

import asyncio
import os

from mljob.worker import TaskContext

#: The `sleep` handler's duration, from the worker's environment (set by bench/mljob_e2e.py).
SLEEP_SECONDS = float(os.environ.get("BENCH_HANDLER_MS", "20")) / 1000

#: The exit status of a worker killed by a crash item (as the kernel's OOM killer would: 128 + 9).
CRASH_EXIT_CODE = 137


def noop(ctx: TaskContext) -> None:
    """Do nothing: the end-to-end benchmark measures mljob's own cost per item."""
    return None


async def noop_async(ctx: TaskContext) -> None:
    """Do nothing, on the event loop: what the raw script's worker does inline (bench/baseline_raw.py),
    so the end-to-end benchmark compares the frameworks, not a thread hop per call."""
    return None


async def sleep(ctx: TaskContext) -> None:
    """Wait BENCH_HANDLER_MS (20 ms by default) without using a core, as a remote model call
    does; async, like the raw script's handler (bench/baseline_raw.py), so both pay the same."""
    await asyncio.sleep(SLEEP_SECONDS)


def noop_or_crash(ctx: TaskContext) -> None:
    """Do nothing, except for the job's `crash_items`: those kill the worker process outright on
    every delivery (no result, no NAK), as a segfault in a native library would."""
    if ctx.item_id in ctx.params.get("crash_items", ()):
        os._exit(CRASH_EXIT_CODE)
    return None
