"""Batch handlers and the grouped result publish, as pure logic (fakes, no services).

The same behaviour on the real stack: tests/test_worker_batch_nats.py (worker processes against
NATS) and tests/e2e/test_e2e_batch.py (operator, collector, Postgres).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats.errors
import pytest

from mljob import protocol
from mljob.worker import PermanentError, TaskContext, Worker, WorkerConfig, batch_handler
from mljob.worker import worker as worker_module
from mljob.worker.batching import BatchAssembler, Quarantine
from mljob.worker.handler import DEFAULT_BATCH_SIZE, DEFAULT_BATCH_WAIT_SECONDS, BatchSpec, batch_spec
from mljob.worker.runner import batch_outcomes
from mljob.worker.slots import Slots
from mljob.worker.taskmsg import HeartbeatLog, TaskMsg, heartbeat
from support.workers.fakes import (
    Events,
    FakeMsg,
    binding,
    make_runner,
    process_batch,
    published,
    running,
    task,
)

pytestmark = pytest.mark.unit


def msgs(events: Events, ids: list[str], delivered: int = 1) -> list[FakeMsg]:
    return [FakeMsg(task(i, n=n), events, delivered=delivered) for n, i in enumerate(ids)]


def settled(events: Events) -> list[tuple[Any, ...]]:
    return [e for e in events if e[0] in {"ack", "nak", "term"}]


# --------------------------------------------------------------------------- the handler's outcomes


async def test_one_call_for_the_batch_then_one_publish_acks_and_one_flush() -> None:
    calls: list[list[str]] = []

    @batch_handler
    def double(tasks: list[TaskContext]) -> list[Any]:
        calls.append([t.item_id for t in tasks])
        return [{"n2": t.item["n"] * 2, "attempt": t.attempt} for t in tasks]

    events: Events = []
    await process_batch(double, events, msgs(events, ["a", "b", "c"]))
    assert calls == [["a", "b", "c"]]
    assert [e[0] for e in events] == ["publish"] * 3 + ["ack"] * 3 + ["flush"]
    results = published(events)
    assert [r.item_id for r in results] == ["a", "b", "c"]
    assert [r.result for r in results] == [
        {"n2": 0, "attempt": 1},
        {"n2": 2, "attempt": 1},
        {"n2": 4, "attempt": 1},
    ]
    assert all(
        e[3] == {"Nats-Msg-Id": f"result:u1:{r.item_id}"} for e, r in zip(events, results, strict=False)
    )


async def test_an_exception_in_the_list_counts_for_its_task_alone() -> None:
    def mixed(tasks: list[TaskContext]) -> list[Any]:
        return [PermanentError("corrupt"), RuntimeError("gpu busy"), {"ok": True}]

    events: Events = []
    batch = msgs(events, ["bad", "flaky", "good"])
    await process_batch(mixed, events, batch, binding(max_deliver=3))
    results = {r.item_id: r for r in published(events)}
    assert set(results) == {"bad", "good"}
    assert results["bad"].outcome is protocol.Outcome.FAILED and results["bad"].error == "corrupt"
    assert results["good"].outcome is protocol.Outcome.SUCCEEDED
    assert ("nak", 2) in events  # the transient one: redelivered after min(30, 2^1) s
    assert sorted(e[0] for e in settled(events)) == ["ack", "ack", "nak"]

    events = []  # on its last delivery the transient error fails the item
    await process_batch(
        mixed, events, msgs(events, ["bad", "flaky", "good"], delivered=3), binding(max_deliver=3)
    )
    flaky = next(r for r in published(events) if r.item_id == "flaky")
    assert flaky.error == "exhausted 3 deliveries: RuntimeError: gpu busy" and flaky.attempts == 3


async def test_an_exception_raised_by_the_call_counts_for_every_task() -> None:
    async def broken(tasks: list[TaskContext]) -> list[Any]:
        raise RuntimeError("CUDA out of memory")

    events: Events = []
    await process_batch(broken, events, msgs(events, ["a", "b"]), binding(max_deliver=2))
    assert events == [("nak", 2), ("nak", 2)]

    events = []
    await process_batch(broken, events, msgs(events, ["a", "b"], delivered=2), binding(max_deliver=2))
    assert [r.error for r in published(events)] == [
        "exhausted 2 deliveries: RuntimeError: CUDA out of memory"
    ] * 2
    assert [e[0] for e in settled(events)] == ["ack", "ack"]

    def refuses(tasks: list[TaskContext]) -> list[Any]:
        raise PermanentError("model cannot read this job's inputs")

    events = []
    await process_batch(refuses, events, msgs(events, ["a", "b"]))
    assert [r.error for r in published(events)] == ["model cannot read this job's inputs"] * 2


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1], "the batch handler returned 1 outcome(s) for 2 task(s)"),
        ([1, 2, 3], "the batch handler returned 3 outcome(s) for 2 task(s)"),
        ({"a": 1, "b": 2}, "it returned dict"),
        (None, "it returned NoneType"),
        ("ab", "it returned str"),
    ],
)
async def test_a_wrong_number_of_outcomes_retries_then_fails_every_task(returned: Any, message: str) -> None:
    events: Events = []
    await process_batch(lambda tasks: returned, events, msgs(events, ["a", "b"]), binding(max_deliver=2))
    assert events == [("nak", 2), ("nak", 2)]  # nothing lost, nothing published

    events = []
    await process_batch(
        lambda tasks: returned, events, msgs(events, ["a", "b"], delivered=2), binding(max_deliver=2)
    )
    errors = [r.error or "" for r in published(events)]
    assert len(errors) == 2 and all(e.startswith("exhausted 2 deliveries: BatchShapeError: ") for e in errors)
    assert all(message in e for e in errors)


async def test_tuples_and_generators_are_accepted_as_the_list() -> None:
    assert batch_outcomes((1, 2), 2) == [1, 2]
    assert batch_outcomes((x for x in "ab"), 2) == ["a", "b"]


async def test_unusable_messages_are_decided_alone_and_the_handler_sees_the_rest_in_order() -> None:
    seen: list[str] = []

    def handler(tasks: list[TaskContext]) -> list[Any]:
        seen.extend(t.item_id for t in tasks)
        return [t.item_id.upper() for t in tasks]

    events: Events = []
    batch = [
        FakeMsg(task("x"), events),
        FakeMsg(b"{}", events, headers={"Nats-Msg-Id": "u1:broken"}),
        FakeMsg(b"junk", events),  # no item to report: TERM
        FakeMsg(task("y"), events),
    ]
    await process_batch(handler, events, batch)
    assert seen == ["x", "y"]
    results = {r.item_id: r for r in published(events)}
    assert results["x"].result == "X" and results["y"].result == "Y"
    assert (results["broken"].error or "").startswith("malformed task")
    assert sorted(e[0] for e in settled(events)) == ["ack", "ack", "ack", "term"]


async def test_results_too_big_or_not_json_fail_their_item_only() -> None:
    events: Events = []
    returned = ["x" * (protocol.MAX_RESULT_BYTES + 1), {"when": object()}, "fine"]
    await process_batch(lambda tasks: returned, events, msgs(events, ["big", "odd", "ok"]))
    results = {r.item_id: r for r in published(events)}
    assert "over the limit of" in (results["big"].error or "")
    assert "not JSON-serialisable" in (results["odd"].error or "")
    assert results["ok"].outcome is protocol.Outcome.SUCCEEDED


async def test_a_batch_heartbeats_every_task_once_per_interval_and_naks_all_when_cancelled() -> None:
    started = asyncio.Event()

    async def slow(tasks: list[TaskContext]) -> list[Any]:
        started.set()
        await asyncio.sleep(30)
        return [None] * len(tasks)

    events: Events = []
    announced: list[str] = []
    runner = make_runner(slow, events)

    async def announce(subject: str) -> None:
        announced.append(subject)

    runner.announce = announce
    async with running(runner):
        work = asyncio.create_task(runner.process_batch(binding(ack_wait=1.5), msgs(events, ["a", "b", "c"])))  # type: ignore[arg-type]
        await started.wait()
        while len(announced) < 2:
            await asyncio.sleep(0.05)
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
    beats = events.count(("wpi",))
    assert beats >= 6 and beats % 3 == 0  # three tasks, one +WPI each per interval
    assert set(announced) == {protocol.heartbeat_subject("p", "u1")}
    assert events[-3:] == [("nak", None)] * 3 and ("ack",) not in events


class FlakyHeartbeat(FakeMsg):
    """A task whose +WPI fails `failures` times (NATS refusing it), then works."""

    def __init__(self, item_id: str, events: Events, failures: int) -> None:
        super().__init__(task(item_id), events)
        self.failures = failures
        self.beats = 0

    async def in_progress(self) -> None:
        self.beats += 1
        if self.beats <= self.failures:
            raise ConnectionError(f"refused heartbeat {self.beats}")
        await super().in_progress()


async def test_a_failing_heartbeat_is_a_warning_naming_the_task_and_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: Events = []
    # "bad" fails three times, then works, then fails again for good; "good" always works.
    bad, good = FlakyHeartbeat("bad", events, failures=3), FakeMsg(task("good"), events)
    tasks = [TaskMsg(bad), TaskMsg(good)]  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger="mljob.worker.taskmsg"):
        beating = asyncio.create_task(heartbeat(tasks, 0.001, binding().entry, None, HeartbeatLog()))
        while bad.beats < 4:
            await asyncio.sleep(0.001)
        bad.failures = 10**9  # fails again from the next beat on
        start = bad.beats
        while bad.beats < start + 3:
            await asyncio.sleep(0.001)
        beating.cancel()
        with pytest.raises(asyncio.CancelledError):
            await beating
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # when it started failing, and again after a success
    assert all(w.startswith("heartbeat of item bad of job u1 failed: ") for w in warnings), warnings
    assert "refused heartbeat 1" in warnings[0] and f"refused heartbeat {start + 1}" in warnings[1]
    repeats = [
        r for r in caplog.records if r.levelno == logging.DEBUG and "item bad of job u1" in r.getMessage()
    ]
    assert repeats, "the repeats of a failing task's heartbeat are not logged at all"
    assert events.count(("wpi",)) >= bad.beats - 1  # the good task kept beating meanwhile


# --------------------------------------------------------------------------- grouped publish


async def test_results_finished_together_go_out_as_one_group_and_a_fast_task_does_not_wait() -> None:
    release = asyncio.Event()

    async def handler(ctx: TaskContext) -> str:
        if ctx.item_id == "slow":
            await release.wait()
        return ctx.item_id

    events: Events = []
    runner = make_runner(handler, events)
    async with running(runner):
        fast = [asyncio.create_task(runner.process(binding(), m)) for m in msgs(events, ["f1", "f2", "f3"])]  # type: ignore[arg-type]
        slow = asyncio.create_task(runner.process(binding(), FakeMsg(task("slow"), events)))  # type: ignore[arg-type]
        await asyncio.gather(*fast)  # settled while the slow one still runs
        assert not slow.done()
        assert [e[0] for e in events] == ["publish"] * 3 + ["ack"] * 3 + ["flush"]
        release.set()
        await slow
    assert [e[0] for e in events][-3:] == ["publish", "ack", "flush"]


async def test_a_result_the_stream_refused_is_retried_alone_and_the_others_are_acked() -> None:
    def refuse_b_once(call: int, message: Any) -> BaseException | None:
        return RuntimeError("503 no responders") if call == 1 and message.msg_id.endswith(":b") else None

    events: Events = []
    await process_batch(lambda tasks: [1, 2, 3], events, msgs(events, ["a", "b", "c"]), fail=refuse_b_once)
    sent = [(e[0], e[2].item_id) if e[0] == "publish" else (e[0],) for e in events]
    assert sent == [
        ("publish", "a"),
        ("publish", "b"),
        ("publish", "c"),
        ("ack",),
        ("ack",),
        ("flush",),
        ("publish", "b"),
        ("ack",),
        ("flush",),
    ]


async def test_results_never_stored_are_naked_at_once_after_the_last_try() -> None:
    events: Events = []
    await process_batch(lambda tasks: [1, 2], events, msgs(events, ["a", "b"]), fail=True, attempts=3)
    assert [e[0] for e in events] == ["publish"] * 6 + ["nak", "nak"]
    assert ("ack",) not in events and events[-1] == ("nak", None)


async def test_a_result_failing_through_an_outage_is_retried_past_its_attempts_and_acked_not_naked() -> None:
    """A JetStream leader election fails every publish for seconds: within `patience` the result
    is tried again (more often than `attempts`), stored, and its task ACKed; a NAK would have
    spent one of the task's deliveries on an item whose result was ready."""

    def outage_for_eight_calls(call: int, message: Any) -> BaseException | None:
        return nats.errors.NoRespondersError() if call <= 8 else None

    events: Events = []
    await process_batch(
        lambda tasks: [1], events, msgs(events, ["a"]), fail=outage_for_eight_calls, attempts=3, patience=30.0
    )
    assert [e[0] for e in events] == ["publish"] * 9 + ["ack", "flush"]


async def test_a_result_never_stored_is_naked_once_its_patience_is_spent_even_past_its_attempts() -> None:
    events: Events = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    await process_batch(lambda tasks: [1], events, msgs(events, ["a"]), fail=True, attempts=2, patience=0.3)
    assert loop.time() - started >= 0.3
    assert settled(events) == [("nak", None)]
    assert sum(e[0] == "publish" for e in events) > 2


def test_the_settle_bound_outlasts_the_patience() -> None:
    from mljob.worker.results import settle_bound

    assert settle_bound(5, 0.2, 5.0, 5.0, patience=60.0) > 60.0 + 2 * (2 * 5.0 + 5.0)
    assert settle_bound(5, 0.2, 5.0, 5.0) > 5 * 2 * (2 * 5.0 + 5.0)


async def test_a_task_naked_while_its_result_was_being_published_is_not_acked_after() -> None:
    gate, publishing = asyncio.Event(), asyncio.Event()
    events: Events = []
    runner = make_runner(lambda ctx: 1, events)
    publish_many = runner.results.publish_many

    async def slow_publish(messages: Any) -> dict[int, BaseException]:
        publishing.set()
        await gate.wait()
        return await publish_many(messages)

    runner.results.publish_many = slow_publish
    async with running(runner):
        work = asyncio.create_task(runner.process(binding(), FakeMsg(task("a"), events)))  # type: ignore[arg-type]
        await publishing.wait()
        work.cancel()  # the worker stops: the task is NAKed
        with pytest.raises(asyncio.CancelledError):
            await work
        gate.set()
        while not any(e[0] == "publish" for e in events):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
    assert events[0] == ("nak", None)
    assert ("ack",) not in events  # the result went out (deduplicated on redelivery), the task stays NAKed


# --------------------------------------------------------------------------- forming batches


async def test_assembler_cuts_full_batches_and_sends_a_partial_one_after_its_wait() -> None:
    batches: list[list[int]] = []
    assembler = BatchAssembler(3, 0.05, lambda batch: batches.append(list(batch)))
    assembler.add([1, 2, 3, 4, 5, 6, 7])  # type: ignore[list-item]
    assert batches == [[1, 2, 3], [4, 5, 6]] and len(assembler) == 1
    assembler.add([8])  # type: ignore[list-item]
    while len(batches) < 3:
        await asyncio.sleep(0.01)
    assert batches[2] == [7, 8] and len(assembler) == 0

    assembler.add([9])  # type: ignore[list-item]
    assert assembler.take() == [9]
    await asyncio.sleep(0.1)
    assert len(batches) == 3  # taken back: never sent

    at_once = BatchAssembler(4, 0, lambda batch: batches.append(list(batch)))
    at_once.add([10, 11])  # type: ignore[list-item]
    assert batches[-1] == [10, 11]


async def test_a_redelivered_task_runs_only_once_it_is_all_the_worker_holds() -> None:
    slots = Slots(10)
    quarantine = Quarantine(slots)
    slots.take(4)  # a batch of four running
    slots.take(1)
    quarantine.admit()  # the redelivered task
    entered = asyncio.Event()

    async def suspect() -> None:
        async with quarantine.alone():
            entered.set()

    waiting = asyncio.create_task(suspect())
    await asyncio.sleep(0.05)
    assert not entered.is_set()
    slots.release(3)
    await asyncio.sleep(0.05)
    assert not entered.is_set()
    slots.release(1)  # only the redelivered task is held now
    await asyncio.wait_for(waiting, 5)
    assert entered.is_set()


class FakePuller:
    def __init__(self, *queue: FakeMsg) -> None:
        self.queue = list(queue)
        self.asked: list[int] = []

    async def fetch(self, batch: int) -> list[FakeMsg]:
        self.asked.append(batch)
        out, self.queue = self.queue[:batch], self.queue[batch:]
        return out


async def test_a_batch_handler_worker_fetches_a_redelivered_task_by_itself() -> None:
    events: Events = []
    worker = Worker(WorkerConfig(pipeline="p"), batch_handler(max_size=8)(lambda tasks: tasks))
    redelivered = FakePuller(*msgs(events, ["r1"], delivered=2), *msgs(events, ["n1", "n2"]))
    assert [m.item() for m in await worker._fetch(redelivered, 8)] == ["r1"]  # type: ignore[arg-type]
    assert redelivered.asked == [1]
    fresh = FakePuller(*msgs(events, ["n1", "n2", "n3"]))
    assert [m.item() for m in await worker._fetch(fresh, 8)] == ["n1", "n2", "n3"]  # type: ignore[arg-type]
    assert fresh.asked == [1, 7]

    plain = Worker(WorkerConfig(pipeline="p"), lambda ctx: 1)
    one_fetch = FakePuller(*msgs(events, ["r1"], delivered=2), *msgs(events, ["n1"]))
    assert len(await plain._fetch(one_fetch, 8)) == 2 and one_fetch.asked == [8]  # type: ignore[arg-type]


async def test_a_wake_up_during_a_round_starts_the_next_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # Idle polls so long that only the wake-up can start a second round.
    monkeypatch.setattr(worker_module, "IDLE_POLL_MIN_SECONDS", 3600.0)
    worker = Worker(WorkerConfig(pipeline="p", idle_poll_max_seconds=3600), lambda ctx: 1)
    rounds = 0
    second = asyncio.Event()

    async def round_() -> int:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            worker._wake.set()  # e.g. a job registered while this round fetched
        else:
            second.set()
        return 0

    monkeypatch.setattr(worker, "_round", round_)
    dispatching = asyncio.create_task(worker._dispatch())
    try:
        await asyncio.wait_for(second.wait(), 10)  # a bound against a hang, not a timing
    finally:
        dispatching.cancel()
    assert rounds >= 2


# --------------------------------------------------------------------------- declaring one


def test_batch_handler_marks_the_function_and_settings_win_over_its_defaults() -> None:
    @batch_handler
    def bare(tasks: list[TaskContext]) -> list[Any]:
        return []

    @batch_handler(max_size=32, max_wait=0.2)
    async def sized(tasks: list[TaskContext]) -> list[Any]:
        return []

    assert batch_spec(bare) == BatchSpec() and batch_spec(sized) == BatchSpec(32, 0.2)
    assert batch_spec(lambda ctx: 1) is None
    assert BatchSpec().resolved(None, None) == (DEFAULT_BATCH_SIZE, DEFAULT_BATCH_WAIT_SECONDS)
    assert BatchSpec(32, 0.2).resolved(None, None) == (32, 0.2)
    assert BatchSpec(32, 0.2).resolved(4, 0) == (4, 0)
    for bad in ({"max_size": 0}, {"max_size": 2.5}, {"max_wait": -1}):
        with pytest.raises(ValueError, match="batch_handler"):
            batch_handler(**bad)

    class Model:
        @batch_handler(max_size=2)
        def predict(self, tasks: list[TaskContext]) -> list[Any]:
            return []

    assert batch_spec(Model().predict) == BatchSpec(2)  # `module:Class.method` handlers too


def test_a_batch_handler_worker_holds_concurrency_times_batch_size_tasks() -> None:
    config = WorkerConfig(pipeline="p", concurrency=2, batch_size=4)
    worker = Worker(config, batch_handler(max_size=32)(lambda tasks: tasks))
    assert worker.batching == (4, DEFAULT_BATCH_WAIT_SECONDS) and worker._slots.capacity == 8
    assert Worker(config, lambda ctx: 1)._slots.capacity == 2


async def test_a_result_never_settled_is_nakked_after_the_bound() -> None:
    """The settle bound is a safety net for a bug (a publish that never returns): the task is
    NAKed for redelivery and `settle` returns, one sweep for every waiting call (no timer each)."""
    from mljob.worker.outcome import Publish
    from mljob.worker.results import ResultPublisher

    events: Events = []

    async def never(messages: Any) -> dict[int, BaseException]:
        await asyncio.Event().wait()  # a bug: this publish never returns
        return {}

    async def flush() -> None:
        return None

    publisher = ResultPublisher(never, flush, wait_bound=0.2, crash_after_result=None)
    loop_task = asyncio.create_task(publisher.run())
    try:
        (msg,) = msgs(events, ["stuck"])
        result = protocol.Result(
            job_uid="u1", item_id="stuck", outcome=protocol.Outcome.SUCCEEDED, attempts=1, worker="unit"
        )
        await asyncio.wait_for(publisher.settle("p", [(TaskMsg(msg), Publish(result))]), 10)
    finally:
        loop_task.cancel()
    assert settled(events) == [("nak", None)]
