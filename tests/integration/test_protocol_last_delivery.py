"""docs/protocol.md, Acknowledgement rules: a NAK on a task's last delivery is not a retry. NATS
delivers it no more, and the operator fails the item as `MaxDeliveriesExceeded`, exactly as if the
worker had died holding it. Against REAL NATS, Redis and Postgres, with the exhausted-deliveries
fixtures (tests/integration/conftest.py, support/exhausting.py: a job stream, its items
registered, an advisory consumer of its own).
"""

from __future__ import annotations

import time

from nats.aio.client import Client as NATS

from mljob import protocol
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore
from mljob.controller.exhausted import REASON, ExhaustedDeliveries
from support.exhausting import MAX_DELIVER, PIPELINE, WAIT_SECONDS, NewJob, result_row, running
from support.waiting import eventually


async def test_a_nak_on_the_last_delivery_ends_as_max_deliveries_exceeded(
    nc: NATS, advisories: str, store: ResultsStore, state: JobState, new_job: NewJob
) -> None:
    js = nc.jetstream()
    job = await new_job(["a", "b"], "a")
    sub = await js.pull_subscribe_bind(
        durable=protocol.task_consumer(job.uid), stream=protocol.task_stream(PIPELINE)
    )
    loop = ExhaustedDeliveries(js, nc, store, state, consumer=advisories)
    naks = 0
    async with running(loop):
        deadline = time.monotonic() + WAIT_SECONDS
        # Keep pulling as live workers do: the server advises when a pull meets the exhausted task.
        while await result_row(store, job.uid, "a") is None:
            assert time.monotonic() < deadline, f"item a not failed after {naks} NAKs"
            try:
                msgs = await sub.fetch(1, timeout=0.2)
            except TimeoutError:
                continue
            for msg in msgs:
                if msg.metadata.sequence.stream != job.seqs["a"]:
                    await msg.nak(delay=600)  # keep b pending, with deliveries to spare
                    continue
                assert msg.metadata.num_delivered <= MAX_DELIVER, "NATS delivered past max_deliver"
                await msg.nak()  # every delivery, the last one too
                naks += 1
        row = await eventually(
            lambda: result_row(store, job.uid, "a"), WAIT_SECONDS, interval=0.02, what="a's failed row"
        )
    await sub.unsubscribe()
    outcome, error, attempts = row
    assert (naks, outcome, attempts) == (MAX_DELIVER, "failed", MAX_DELIVER)
    assert error is not None and error.startswith(f"{REASON}: ")
    assert await state.failed_ids(job.uid) == {"a"}
    assert await state.pending_ids(job.uid) == {"b"}
