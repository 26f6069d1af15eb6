"""Dispatch baseline: N tasks into a JetStream work-queue stream, the fastest correct way we know.

The guarantee mljob's dispatch gives, kept by every row: a task counts as published only once
the stream confirmed it (its PubAck arrived), every task carries a `Nats-Msg-Id` so a re-publish
is dropped by the stream, and no wait is without a bound. Two ways:

* `publish_async, window`: the limit. Per choice, why it keeps the guarantee:
  - `js.publish_async` for every task, with nats-py's own window of outstanding PubAcks
    (`publish_async_max_pending`, 4,000): up to that many tasks are in flight, each with its own
    reply inbox, so the stream's acks stream back while the producer keeps writing. A task still
    counts only when its PubAck future resolved.
  - No `wait_stall`: nats-py bounds the window's semaphore with an `asyncio.wait_for` per message
    when it is set, a task and a timer each, which also yields the event loop after every
    message, so every task became a TLS write of its own (the old baseline reached 4,600 tasks/s
    that way). Without it a free slot is taken without yielding and nats-py's flusher writes
    thousands of tasks per syscall. The bound moves to the one wait below.
  - One wait for every PubAck, bounded (`asyncio.wait(..., timeout)`): what is not confirmed
    then is cancelled and the run fails; a real producer would resume there, dedup making the
    re-send harmless.
  - Bodies built from a prefix and suffix encoded once plus pydantic-core's JSON of the item
    (what mljob found; same bytes as a whole-task `json.dumps`, about a tenth of the cost).
* `awaited js.publish per message`: one round trip per task, each publish awaited (nats-py's
  request timeout bounds it) before the next: how the original system dispatched. For
  information.

The stream is configured as mljob configures a pipeline's task stream (work queue, file
storage, two-hour duplicate window: the dedup window is part of the guarantee, so it stays),
with the job's durable consumer attached, as mljob has when it publishes (bench/wire.py). Tasks
are mljob-sized (~200 bytes of JSON: version, job, item, params). The clock runs from the first
publish to the last ack; building the bodies counts.

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

from pydantic_core import to_json

from . import common, wire

PIPELINE = "bench-dispatch"
PUBLISH_ASYNC = "publish_async, window (raw)"
AWAITED = "awaited js.publish per message"


def task_encoder(job: wire.Job) -> Callable[[int], bytes]:
    """Task `index`'s body, the same bytes as `common.task_body`, from a prefix and suffix encoded once."""
    whole = common.task_body(job.pipeline, job.uid, 0)
    first = to_json(common.item(0))
    cut = whole.index(first)
    prefix, suffix = whole[:cut], whole[cut + len(first) :]
    return lambda index: prefix + to_json(common.item(index)) + suffix


async def publish_async_all(js: Any, job: wire.Job, items: int, timeout: float = 600.0) -> None:
    """Every task with publish_async in nats-py's window, then one bounded wait for every PubAck."""
    body = task_encoder(job)
    subject, uid = job.task_subject, job.uid
    futures = [
        await js.publish_async(subject, body(i), headers={"Nats-Msg-Id": f"{uid}:item-{i:07d}"})
        for i in range(items)
    ]
    done, missing = await asyncio.wait(futures, timeout=timeout)
    for future in missing:
        future.cancel()
    if missing:
        raise common.BenchError(f"{len(missing)} PubAcks missing after {timeout:.0f}s (see the NATS log)")
    for future in done:
        future.result()  # a refusal (e.g. no permission) raises here


async def publish_awaited(js: Any, job: wire.Job, items: int, timeout: float = 600.0) -> None:
    """One awaited publish per task (each fails by itself after nats-py's request timeout)."""
    body = task_encoder(job)
    for i in range(items):
        await js.publish(job.task_subject, body(i), headers={"Nats-Msg-Id": common.task_msg_id(job.uid, i)})


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
