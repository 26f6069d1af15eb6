"""A stand-in model for `make demo`, and the demo's MLJob manifest.

The handler is deterministic per item id (latency, label, failure), so two runs of the demo are
comparable; only the crash items kill their worker, on every delivery, so JetStream's
redeliveries run out and the operator's recovery (a `MaxDeliveriesExceeded` failure within
seconds) shows. Imports only what a worker-only install has: the handler runs in `mljob worker`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from mljob.worker import PermanentError, TaskContext

LABELS = ("cat", "dog", "bird", "car", "tree", "boat")
#: digest[0] below this fails the item permanently: 5/256, about 2 % of the items.
FAIL_BELOW = 5
#: The exit status of a worker killed by a crash item (the supervisor reports it).
CRASH_EXIT_CODE = 3
#: Where the crash items sit, as fractions of the job: early enough that their redeliveries and
#: exhaustion overlap with the rest of the work instead of trailing it.
CRASH_AT = (0.1, 0.3, 0.5)
PIPELINE = "demo-classify"


def item_id(index: int) -> str:
    return f"img-{index:05d}.jpg"


def _digest(item: str) -> bytes:
    """The item's fixed "content": everything the fake model decides about it comes from here."""
    return hashlib.sha256(f"demo:{item}".encode()).digest()


def latency(item: str, mean: float) -> float:
    """This item's inference time: between 0.5 and 1.5 times `mean`, the same on every run."""
    return mean * (0.5 + _digest(item)[3] / 255)


def unreadable(item: str) -> bool:
    """Whether the model fails this image permanently (about 2 % of them, always the same)."""
    return _digest(item)[0] < FAIL_BELOW


def classify(task: TaskContext) -> dict[str, Any]:
    """Sleep like a small model, then label the image; about 2 % of the images are unreadable,
    and the job's `crash_items` kill the worker process outright (as a segfault in a native
    library would: no result, no NAK, the task comes back after ackWaitSeconds)."""
    if task.item_id in task.params.get("crash_items", ()):
        os._exit(CRASH_EXIT_CODE)
    digest = _digest(task.item_id)
    time.sleep(latency(task.item_id, float(task.params.get("latency_seconds", 0.01))))
    if unreadable(task.item_id):
        raise PermanentError(f"{task.item_id}: corrupt image header")
    return {"label": LABELS[digest[1] % len(LABELS)], "score": round(0.5 + digest[2] / 512, 3)}


def crash_items(total: int) -> list[str]:
    """The items that crash their worker: at fixed fractions of the job, distinct."""
    return sorted({item_id(int(total * at)) for at in CRASH_AT if total > 0})


def manifest(
    total: int,
    latency_seconds: float,
    crashing: Sequence[str],
    *,
    name: str = PIPELINE,
    namespace: str = "default",
    max_deliver: int = 2,
    ack_wait_seconds: int = 5,
    failure_threshold: float = 0.05,
) -> dict[str, Any]:
    """The demo's MLJob: `total` images, two deliveries each and a short ack wait, so a task
    whose worker died comes back within seconds and a crash item is given up on after two."""
    items = [{"id": item_id(i), "url": f"s3://demo-bucket/raw/{item_id(i)}"} for i in range(total)]
    return {
        "apiVersion": "mljob.dev/v1alpha1",
        "kind": "MLJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "pipeline": PIPELINE,
            "items": items,
            "params": {"latency_seconds": latency_seconds, "crash_items": list(crashing)},
            "maxDeliver": max_deliver,
            "ackWaitSeconds": ack_wait_seconds,
            "failureThreshold": failure_threshold,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mljob.demo crash-items N` prints the default crash items (comma-separated);
    `python -m mljob.demo manifest N LATENCY CRASH,ITEMS` prints the MLJob (JSON: kubectl reads it)."""
    parser = argparse.ArgumentParser(prog="python -m mljob.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    crash = sub.add_parser("crash-items", help="the default crash items of a job of N items")
    crash.add_argument("items", type=int)
    job = sub.add_parser("manifest", help="the demo MLJob")
    job.add_argument("items", type=int)
    job.add_argument("latency", type=float, help="mean seconds per item")
    job.add_argument("crash", help="comma-separated item ids that crash their worker ('' for none)")
    args = parser.parse_args(argv)
    if args.command == "crash-items":
        print(",".join(crash_items(args.items)))
    else:
        crashing = [i for i in args.crash.split(",") if i]
        print(json.dumps(manifest(args.items, args.latency, crashing)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
