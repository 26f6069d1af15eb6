"""A stand-in model for `make demo`: deterministic fake inference, with a few unreadable images."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from mljob.worker import PermanentError, TaskContext

LABELS = ("cat", "dog", "bird", "car", "tree", "boat")


def classify(task: TaskContext) -> dict[str, Any]:
    """Sleep like a small model would, then return a label derived from the item id (~5 % fail)."""
    digest = hashlib.sha256(task.item_id.encode()).digest()
    time.sleep(float(task.params.get("latency_seconds", 0.01)))
    if digest[0] < 13:
        raise PermanentError(f"{task.item_id}: corrupt image header")
    return {"label": LABELS[digest[1] % len(LABELS)], "score": round(0.5 + digest[2] / 512, 3)}
