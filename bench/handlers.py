"""Handlers of the mljob benchmarks' workers (`mljob worker --handler bench.handlers:noop`).

Plain functions, as a user writes them: the worker runs each call in a thread of its own.
"""

from __future__ import annotations

import os

from mljob.worker import TaskContext

#: The exit status of a worker killed by a crash item (as the kernel's OOM killer would: 128 + 9).
CRASH_EXIT_CODE = 137


def noop(ctx: TaskContext) -> None:
    """Do nothing: the end-to-end benchmark measures mljob's own cost per item."""
    return None


def noop_or_crash(ctx: TaskContext) -> None:
    """Do nothing, except for the job's `crash_items`: those kill the worker process outright on
    every delivery (no result, no NAK), as a segfault in a native library would."""
    if ctx.item_id in ctx.params.get("crash_items", ()):
        os._exit(CRASH_EXIT_CODE)
    return None
