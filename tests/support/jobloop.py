"""Jobs over the in-memory fakes for the job-loop and scheduler unit tests (their fixtures,
`clock` and `world`, are in tests/unit/conftest.py)."""

from __future__ import annotations

from typing import Any

from mljob.adapters.kube import JobRef
from mljob.api.models import Phase
from mljob.controller.loop import JobLoop
from support.fakes import FakeWorld

NAMESPACE = "ml"
PIPELINE = "embed"
STALL = 60
MAX_RECREATIONS = 2


def item_ids(count: int) -> list[str]:
    return [f"item-{n:03d}" for n in range(count)]


def new_job(world: FakeWorld, count: int = 10, name: str = "job", **spec: Any) -> dict[str, Any]:
    """An MLJob with `count` inline items; returns kopf's live body (held by the fake Kube)."""
    full: dict[str, Any] = {"pipeline": PIPELINE, "stallTimeoutSeconds": STALL, **spec}
    if "itemsFrom" not in full:
        full["items"] = item_ids(count)
    return world.kube.create_job(NAMESPACE, name, full)


def uid_of(body: dict[str, Any]) -> str:
    return str(body["metadata"]["uid"])


def ref_of(body: dict[str, Any]) -> JobRef:
    meta = body["metadata"]
    return JobRef(meta["namespace"], meta["name"], meta["uid"])


async def running(world: FakeWorld, body: dict[str, Any]) -> JobLoop:
    """A loop whose job has been dispatched (one tick) and whose counts were seen once."""
    loop = JobLoop(world.services, body)
    assert not await loop.step()
    assert body["status"]["phase"] == Phase.RUNNING
    assert not await loop.step()
    return loop


def status(body: dict[str, Any]) -> dict[str, Any]:
    return dict(body.get("status") or {})
