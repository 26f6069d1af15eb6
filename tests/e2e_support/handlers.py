"""Worker handlers used by the end-to-end tests (imported by real `mljob worker` processes)."""

from __future__ import annotations

import os
import time
from typing import Any

from mljob.worker import PermanentError


def _number(item_id: str) -> int:
    digits = "".join(ch for ch in item_id if ch.isdigit())
    return int(digits) if digits else 0


def tenth_fail(task: Any) -> dict[str, Any]:
    """Fails permanently for ids whose number ends in 7 (10 % of a 0..N-1 range)."""
    number = _number(task.item_id)
    if number % 10 == 7:
        raise PermanentError(f"item {task.item_id} is unreadable")
    return {"id": task.item_id, "double": number * 2}


def mostly_fail(task: Any) -> dict[str, Any]:
    """Fails permanently for 60 % of items: the job must end Failed."""
    number = _number(task.item_id)
    if number % 10 < 6:
        raise PermanentError(f"item {task.item_id} rejected")
    return {"ok": True}


def quick(task: Any) -> dict[str, Any]:
    return {"id": task.item_id}


def slow(task: Any) -> dict[str, Any]:
    time.sleep(float(os.environ.get("MLJOB_TEST_SLEEP", "0.005")))
    return {"id": task.item_id}


def recording(task: Any) -> dict[str, Any]:
    """Appends every handled item id to $MLJOB_TEST_RECORD: proves redeliveries and exactly-once."""
    with open(os.environ["MLJOB_TEST_RECORD"], "a") as out:
        out.write(task.item_id + "\n")
    time.sleep(float(os.environ.get("MLJOB_TEST_SLEEP", "0")))
    return {"id": task.item_id}


def crash_on_listed(task: Any) -> dict[str, Any]:
    """Kills the whole worker process on the ids listed in $MLJOB_TEST_CRASH_ITEMS, on every delivery:
    the task is never answered, so NATS redelivers it until max_deliver is exhausted (row 2)."""
    listed = {i for i in os.environ.get("MLJOB_TEST_CRASH_ITEMS", "").split(",") if i}
    if task.item_id in listed:
        os._exit(1)
    return {"id": task.item_id}
