"""Worker handlers used by the end-to-end tests (imported by real `mljob worker` processes)."""

from __future__ import annotations

import os
import time
from typing import Any

from mljob.worker import PermanentError, batch_handler


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


def echo_item(task: Any) -> dict[str, Any]:
    """The item as the task carried it: shows which fields a (re-)published task had."""
    return {"item": task.item}


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


def nul_on_listed(task: Any) -> dict[str, Any]:
    """Scenario E: for the ids in $MLJOB_TEST_NUL_ITEMS, a result whose JSON holds a NUL
    (`\\u0000`), which Postgres refuses on every delivery; a plain result for the others."""
    listed = {i for i in os.environ.get("MLJOB_TEST_NUL_ITEMS", "").split(",") if i}
    if task.item_id in listed:
        return {"id": task.item_id, "caption": "cut\u0000here"}
    return {"id": task.item_id}


def two_reasons(task: Any) -> dict[str, Any]:
    """Fails two ways: ids whose number ends in 7 raise a PermanentError (HandlerFailed, the error
    quoting the id), those ending in 3 return a result Postgres refuses (a NUL: ResultRejected)."""
    number = _number(task.item_id)
    if number % 10 == 7:
        raise PermanentError(f"item {task.item_id} is unreadable")
    if number % 10 == 3:
        return {"id": task.item_id, "caption": "cut\u0000here"}
    return {"id": task.item_id, "double": number * 2}


def sleep_from_id(task: Any) -> dict[str, Any]:
    """Sleeps the seconds written after '@' in the id ('j3-last@0.4'), else $MLJOB_TEST_SLEEP:
    one worker gives each job of a race its own timing."""
    _, _, delay = task.item_id.partition("@")
    time.sleep(float(delay) if delay else float(os.environ.get("MLJOB_TEST_SLEEP", "0")))
    return {"id": task.item_id}


def gated(task: Any) -> dict[str, Any]:
    """Holds the task until the file $MLJOB_TEST_GATE_DIR/<id before the first '-'> exists (at
    most 60 s): the test decides when each job's results land, e.g. racing its cancel."""
    gate = os.path.join(os.environ["MLJOB_TEST_GATE_DIR"], task.item_id.split("-", 1)[0])
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"id": task.item_id}


# --------------------------------------------------------------------------- batch handlers


def _record_call(tasks: list[Any]) -> None:
    """One line per call, `<delivery>:<id> ...`, to $MLJOB_TEST_RECORD when it is set."""
    path = os.environ.get("MLJOB_TEST_RECORD")
    if path:
        with open(path, "a") as out:
            out.write(" ".join(f"{t.attempt}:{t.item_id}" for t in tasks) + "\n")


@batch_handler(max_size=16, max_wait=0.05)
def batch_tenth_fail(tasks: list[Any]) -> list[Any]:
    """`tenth_fail` as a batch: one "model call" per batch, a PermanentError for the items whose
    number ends in 7; sleeps $MLJOB_TEST_SLEEP per call."""
    _record_call(tasks)
    time.sleep(float(os.environ.get("MLJOB_TEST_SLEEP", "0")))
    return [
        PermanentError(f"item {t.item_id} is unreadable")
        if _number(t.item_id) % 10 == 7
        else {"n2": _number(t.item_id) * 2}
        for t in tasks
    ]


@batch_handler(max_size=8)
async def batch_raise_on_listed(tasks: list[Any]) -> list[Any]:
    """Raises for the whole batch when it holds an id listed in $MLJOB_TEST_BAD_ITEMS (as a model
    call that one bad input breaks): its batch-mates are retried, alone, and succeed."""
    _record_call(tasks)
    listed = set(os.environ.get("MLJOB_TEST_BAD_ITEMS", "").split(","))
    bad = sorted(t.item_id for t in tasks if t.item_id in listed)
    if bad:
        raise RuntimeError(f"model rejected the batch: {','.join(bad)}")
    return [{"id": t.item_id} for t in tasks]


@batch_handler(max_size=8)
def batch_crash_on_listed(tasks: list[Any]) -> list[Any]:
    """Kills the worker process when the batch holds an id listed in $MLJOB_TEST_CRASH_ITEMS, on
    every delivery (a segfault in the model): the whole batch dies with it."""
    _record_call(tasks)
    listed = set(os.environ.get("MLJOB_TEST_CRASH_ITEMS", "").split(","))
    if any(t.item_id in listed for t in tasks):
        os._exit(1)
    time.sleep(float(os.environ.get("MLJOB_TEST_SLEEP", "0")))
    return [{"id": t.item_id} for t in tasks]
