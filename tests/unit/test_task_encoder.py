"""The dispatcher's task bodies (dispatch.TaskEncoder) are exactly protocol.Task's encoding.

TaskEncoder builds each body from a prefix and suffix encoded once plus the item's JSON (a model
per task was a third of dispatch's CPU); whatever the item or params hold, the bytes must be
those of `protocol.Task(...).encode()`, and strict JSON that a worker in any language can parse.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from mljob import protocol
from mljob.adapters.tasks import DispatchTarget, TaskEncoder
from mljob.api.models import MLJobSpec

pytestmark = pytest.mark.unit

ITEMS: list[dict[str, Any]] = [
    {"id": "plain"},
    {
        "id": "fields",
        "uri": "s3://bucket/a b.jpg",
        "n": 3,
        "ratio": 0.25,
        "tags": ["x", "y"],
        "meta": {"k": None},
    },
    {"id": "unicode", "caption": "café ☕ \u2028 line", "quote": '"q" \\ back'},
    {"id": "not-finite", "nan": math.nan, "inf": math.inf, "ninf": -math.inf},
]
PARAMS: list[dict[str, Any]] = [
    {},
    {"model": "m-1", "threshold": 0.5},
    {"bad": math.nan, "nested": {"x": math.inf}},
]


def _strict(body: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(body, parse_constant=refuse)


@pytest.mark.parametrize("params", PARAMS, ids=["none", "plain", "not-finite"])
@pytest.mark.parametrize("item", ITEMS, ids=[i["id"] for i in ITEMS])
def test_a_task_body_is_protocol_task_encode_and_strict_json(
    item: dict[str, Any], params: dict[str, Any]
) -> None:
    spec = MLJobSpec.model_validate({"pipeline": "resize", "items": [item], "params": params})
    target = DispatchTarget(uid="u-1", namespace="ns", name="job", spec=spec)
    body = TaskEncoder(target).body(item)
    job = protocol.JobRef(uid="u-1", namespace="ns", name="job", pipeline="resize")
    assert body == protocol.Task(job=job, item=item, params=spec.params or {}).encode()
    decoded = _strict(body)
    assert decoded["item"]["id"] == item["id"]
