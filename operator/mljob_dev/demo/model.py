"""A stand-in model for `make demo`, and the demo's MLJob manifest.

The handler is a batch handler: one call of the stand-in model per batch of images. It is
deterministic per item id (latency, label, failure), so two runs of the demo are comparable;
only the crash items kill their worker, with the batch it holds, on every delivery, so
JetStream's redeliveries of the crash item run out and the operator's recovery (a
`MaxDeliveriesExceeded` failure within seconds) shows, while the other images of its batch come
back and succeed. Imports only what a worker-only install has: the handler runs in `mljob worker`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from mljob.worker import PermanentError, TaskContext, batch_handler

LABELS = ("cat", "dog", "bird", "car", "tree", "boat")
#: digest[0] below this fails the item permanently: 5/256, about 2 % of the items.
FAIL_BELOW = 5
#: The exit status of a worker killed by a crash item (the supervisor reports it).
CRASH_EXIT_CODE = 3
#: Where the crash items sit, as fractions of the job: early enough that their redeliveries and
#: exhaustion overlap with the rest of the work instead of trailing it.
CRASH_AT = (0.1, 0.3, 0.5)
PIPELINE = "demo-classify"
#: Images per model call (the stand-in classifier is a batch handler).
BATCH_SIZE = 8


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


class StandInModel:
    """The demo's pretend image classifier. `predict` labels a whole batch of images in one call
    and takes about as long as the slowest image of it, as a GPU that runs a batch at once."""

    def predict(self, images: Sequence[str], mean_latency: float) -> list[dict[str, Any] | None]:
        """A label and score per image, in order; None for an image it cannot read."""
        time.sleep(max((latency(image, mean_latency) for image in images), default=0.0))
        predictions: list[dict[str, Any] | None] = []
        for image in images:
            digest = _digest(image)
            readable = not unreadable(image)
            label = {"label": LABELS[digest[1] % len(LABELS)], "score": round(0.5 + digest[2] / 512, 3)}
            predictions.append(label if readable else None)
        return predictions


MODEL = StandInModel()


@batch_handler(max_size=BATCH_SIZE, max_wait=0.02)
def classify(tasks: list[TaskContext]) -> list[Any]:
    """Label a batch of images with one model call; an image the model cannot read fails alone
    (a PermanentError in its place), and a batch holding one of the job's `crash_items` kills
    the worker process outright (as a segfault in a native library would: no result, no NAK,
    the batch comes back after ackWaitSeconds, its other images each in a batch of their own)."""
    params = tasks[0].params  # one job per batch: the same params for all
    if any(t.item_id in params.get("crash_items", ()) for t in tasks):
        os._exit(CRASH_EXIT_CODE)
    predictions = MODEL.predict([t.item_id for t in tasks], float(params.get("latency_seconds", 0.01)))
    return [
        prediction if prediction is not None else PermanentError(f"{t.item_id}: corrupt image header")
        for t, prediction in zip(tasks, predictions, strict=True)
    ]


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
    """`python -m mljob_dev.demo.model crash-items N` prints the default crash items (comma-separated);
    `python -m mljob_dev.demo.model manifest N LATENCY CRASH,ITEMS` prints the MLJob (JSON: kubectl
    reads it)."""
    parser = argparse.ArgumentParser(prog="python -m mljob_dev.demo.model")
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
