"""Dispatch baseline: N task messages into a JetStream work-queue stream, two ways, no framework.

* `publish_async`: every message with `js.publish_async` (nats-py's window of outstanding acks),
  then one wait for all the acks; what mljob's dispatch does per chunk.
* `awaited js.publish`: one round trip per message, each publish awaited before the next (how the
  original system dispatched).

Each message is an mljob-sized task (~200 bytes of JSON: version, job, item, params) with a
`Nats-Msg-Id` header, on the job's subject of a pipeline task stream configured like mljob's
(work queue, file storage, two-hour duplicate window), the job's durable consumer attached, as
mljob has when it publishes (see bench/wire.py). The clock runs from the first publish to the
last ack; building the bodies counts.

    python -m bench.baseline_dispatch --items 100000
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from . import common, wire

PIPELINE = "bench-dispatch"
PUBLISH_ASYNC = "publish_async + one wait"
AWAITED = "awaited js.publish per message"


async def publish_async_all(js: Any, job: wire.Job, items: int, timeout: float = 600.0) -> None:
    """All tasks with publish_async, then one wait for every ack (failing after `timeout`: a
    publish the server refuses, e.g. for want of permission, is never acked)."""
    futures = [
        await js.publish_async(
            job.task_subject,
            common.task_body(job.pipeline, job.uid, i),
            headers={"Nats-Msg-Id": common.task_msg_id(job.uid, i)},
            wait_stall=30,
        )
        for i in range(items)
    ]
    try:  # raises the first failed publish, like mljob's publish_chunk
        await asyncio.wait_for(asyncio.gather(*futures), timeout)
    except TimeoutError:
        raise common.BenchError(f"publish acks missing after {timeout:.0f}s (see the NATS log)") from None


async def publish_awaited(js: Any, job: wire.Job, items: int, timeout: float = 600.0) -> None:
    """One awaited publish per task (each fails by itself after nats-py's request timeout)."""
    for i in range(items):
        await js.publish(
            job.task_subject,
            common.task_body(job.pipeline, job.uid, i),
            headers={"Nats-Msg-Id": common.task_msg_id(job.uid, i)},
        )


MODES: dict[str, Callable[[Any, wire.Job, int, float], Awaitable[None]]] = {
    PUBLISH_ASYNC: publish_async_all,
    AWAITED: publish_awaited,
}


async def measure(stack: common.BenchStack, mode: str, items: int) -> common.Run:
    job = wire.Job(PIPELINE, uuid.uuid4().hex[:12])
    nc = await common.nats_connect(f"bench-dispatch-{os.getpid()}")
    try:
        js = nc.jetstream()
        await wire.create_job_consumer(js, job)
        try:
            meter = common.meter(stack, {"operator": [os.getpid()]})
            meter.start()
            began = time.monotonic()
            await MODES[mode](js, job, items, common.stage_timeout(items))
            seconds = time.monotonic() - began
            cpu = meter.stop()
            info = await js.stream_info(job.task_stream)
            if info.state.messages != items:
                raise common.BenchError(f"{mode}: the stream holds {info.state.messages} of {items} tasks")
        finally:
            await wire.delete_pipeline_stream(js, PIPELINE)
    finally:
        await nc.close()
    return common.Run(benchmark="dispatch", system=mode, items=items, seconds=seconds, cpu=cpu)


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__.splitlines()[0], default_items=100_000, workers=None).parse_args(argv)
    with common.local_stack(args) as stack:
        description = common.machine(stack)
        runs: dict[str, list[common.Run]] = {mode: [] for mode in MODES}
        for _ in range(max(1, args.repeat)):  # alternate the modes, so drift hits both alike
            for mode in MODES:
                runs[mode].append(asyncio.run(measure(stack, mode, args.items)))
        shown = [common.median_run(r) for r in runs.values()]
    title = f"Dispatch baseline: {args.items:,} tasks into a JetStream work-queue stream"
    print(description + "\n\n" + common.report(title, shown, args.json_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
