"""Fakes for the worker's unit tests (pure decision and batching logic, no services): a message
that records how it was settled, and a runner whose result publisher records what it sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from types import SimpleNamespace
from typing import Any

import nats

from mljob import protocol
from mljob.transport.jspublish import Outgoing
from mljob.worker.results import ResultPublisher
from mljob.worker.runner import JobBinding, TaskRunner

Events = list[tuple[Any, ...]]


class FakeMsg:
    """The parts of a JetStream message the worker uses; records how it was settled."""

    def __init__(
        self,
        data: bytes,
        events: Events,
        *,
        subject: str = "mljob.tasks.p.u1",
        headers: dict[str, str] | None = None,
        delivered: int = 1,
    ) -> None:
        self.data = data
        self.subject = subject
        self.headers = headers
        self.reply = "$JS.ACK.stream.consumer.1.1.1.0.0"
        self.metadata = SimpleNamespace(num_delivered=delivered)
        self.events = events

    def item(self) -> str:
        return str(protocol.decode_task(self.data).item_id)

    async def ack(self) -> None:
        self.events.append(("ack",))

    async def nak(self, delay: float | None = None) -> None:
        self.events.append(("nak", delay))

    async def term(self) -> None:
        self.events.append(("term",))

    async def in_progress(self) -> None:
        self.events.append(("wpi",))


def binding(max_deliver: int = 3, ack_wait: float = 30.0) -> JobBinding:
    entry = protocol.RegistryEntry(
        uid="u1",
        namespace="ns",
        name="job",
        pipeline="p",
        stream="MLJOB_u1",
        consumer="workers-u1",
        subject="mljob.tasks.p.u1",
        created=protocol.utcnow(),
    )
    return JobBinding(entry=entry, ack_wait=ack_wait, max_deliver=max_deliver)


def task(item_id: str = "i1", **fields: Any) -> bytes:
    job = protocol.JobRef(uid="u1", namespace="ns", name="job", pipeline="p")
    return protocol.Task(job=job, item={"id": item_id, **fields}).encode()


def published(events: Events) -> list[protocol.Result]:
    return [e[2] for e in events if e[0] == "publish"]


Failing = Callable[[int, Outgoing], BaseException | None]


def recording_publisher(
    events: Events, *, fail: bool | Failing = False, attempts: int = 5, patience: float = 0.0, **kw: Any
) -> ResultPublisher:
    """A ResultPublisher whose publish and flush append to `events`; `fail`: every message
    fails (True), or a function of (call number, message) returning the error, or None.
    No patience unless asked for: `attempts` alone decides when a failing result is NAKed."""
    calls = 0

    async def publish_many(messages: Sequence[Outgoing]) -> dict[int, BaseException]:
        nonlocal calls
        calls += 1
        failures: dict[int, BaseException] = {}
        for index, message in enumerate(messages):
            result = protocol.decode_result(message.body)
            events.append(("publish", message.subject, result, {protocol.MSG_ID_HEADER: message.msg_id}))
            error = (
                (nats.errors.TimeoutError() if fail is True else None)
                if not callable(fail)
                else fail(calls, message)
            )
            if error is not None:
                failures[index] = error
        return failures

    async def flush() -> None:
        events.append(("flush",))

    return ResultPublisher(
        publish_many,
        flush,
        attempts=attempts,
        backoff=0.001,
        patience=patience,
        crash_after_result=None,
        **kw,
    )


@contextlib.asynccontextmanager
async def running(runner: TaskRunner) -> AsyncIterator[TaskRunner]:
    """The runner with its result publisher's loop running."""
    loop_task = asyncio.create_task(runner.results.run())
    try:
        yield runner
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task


def make_runner(handler: Any, events: Events, *, fail: bool | Failing = False, **kw: Any) -> TaskRunner:
    return TaskRunner(handler, recording_publisher(events, fail=fail, **kw), "unit")


async def process(
    handler: Any, events: Events, msg: FakeMsg, job: JobBinding | None = None, **kw: Any
) -> None:
    """Run one task through a plain handler, start to finish."""
    async with running(make_runner(handler, events, **kw)) as runner:
        await runner.process(job or binding(), msg)  # type: ignore[arg-type]


async def process_batch(
    handler: Any, events: Events, msgs: list[FakeMsg], job: JobBinding | None = None, **kw: Any
) -> None:
    """Run tasks through one batch handler call, start to finish."""
    async with running(make_runner(handler, events, **kw)) as runner:
        await runner.process_batch(job or binding(), msgs)  # type: ignore[arg-type]
