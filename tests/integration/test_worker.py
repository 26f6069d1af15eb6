"""The worker SDK against real NATS, with `mljob worker` as a real subprocess.

Results are observed with a core NATS subscription on `mljob.results.<uid>`: it sees every
publish, duplicates included. The shared results stream is a work queue that admits no second
consumer over the same subjects, and a collector elsewhere may be draining it, so what JetStream
stored is checked by de-duplication probes, never by counting. Every test uses its own pipeline
and job uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from mljob import protocol
from mljob.adapters.jetstream import (
    JobStreamSettings,
    delete_job_tasks,
    ensure_job_stream,
    ensure_results_stream,
    job_task_count,
    register_job,
    registry,
    unregister_job,
)
from mljob.worker import PermanentError, TaskContext, load_handler
from mljob.worker.handler import HandlerLoadError
from mljob.worker.outcome import nak_delay, publish_retry_delay, recover_ids
from mljob.worker.runner import CRASH_AFTER_RESULT_ENV, JobBinding
from support.stack import StackEnv
from support.waiting import eventually
from support.workers.fakes import Events, FakeMsg, process, published
from support.workers.fakes import binding as _binding
from support.workers.fakes import task as _task

ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


class ResultSink:
    """Every result published for one job, in arrival order, with its Nats-Msg-Id header."""

    def __init__(self) -> None:
        self.messages: list[tuple[protocol.Result, str | None]] = []

    @classmethod
    async def start(cls, nc: Client, uid: str) -> ResultSink:
        sink = cls()

        async def on_msg(msg: Any) -> None:
            msg_id = (msg.headers or {}).get(protocol.MSG_ID_HEADER)
            sink.messages.append((protocol.decode_result(msg.data), msg_id))

        await nc.subscribe(protocol.results_subject("*", uid), cb=on_msg)
        await nc.flush()
        return sink

    def latest(self) -> dict[str, protocol.Result]:
        return {r.item_id: r for r, _ in self.messages}

    def count(self, item_id: str) -> int:
        return sum(1 for r, _ in self.messages if r.item_id == item_id)

    async def wait_items(self, n: int, timeout: float, worker: WorkerProc) -> None:
        """Until results of `n` distinct items arrived (the worker's log in the failure)."""
        await eventually(
            lambda: len(self.latest()) >= n,
            timeout,
            what=lambda: f"results of {n} items (got {len(self.latest())}); worker log:\n{worker.log()}",
        )


class WorkerProc:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code, once the worker has exited."""
        await eventually(
            lambda: self.proc.poll() is not None,
            timeout,
            what=lambda: f"the worker to exit; log:\n{self.log()}",
        )
        return self.proc.poll()


SpawnWorker = Callable[..., WorkerProc]


@pytest.fixture
def spawn_worker(stack: StackEnv, tmp_path: Path) -> Iterator[SpawnWorker]:
    """Start `mljob worker` subprocesses; every one is killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        pipeline: str, handler: str, *args: str, name: str = "w1", env: dict[str, str] | None = None
    ) -> WorkerProc:
        child_env = stack.as_env("worker")
        child_env.pop(CRASH_AFTER_RESULT_ENV, None)
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR), child_env.get("PYTHONPATH")) if p
        )
        child_env.update(env or {})
        log_path = tmp_path / f"{name}.log"
        cmd = [sys.executable, "-m", "mljob.cli.main", "worker", "--pipeline", pipeline, "--handler", handler]
        cmd += ["--worker-id", name, *args]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(cmd, env=child_env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        procs.append(proc)
        return WorkerProc(proc, log_path)

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


class Jobs:
    """Creates job streams, tasks and registry entries for a test, and removes them afterwards."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.created: list[protocol.RegistryEntry] = []

    async def create(
        self, pipeline: str, *, max_deliver: int = 3, ack_wait: float = 30.0
    ) -> protocol.RegistryEntry:
        uid = str(uuid.uuid4())
        settings = JobStreamSettings(
            uid=uid,
            namespace="worker-tests",
            name=f"job-{uid[:8]}",
            pipeline=pipeline,
            max_deliver=max_deliver,
            ack_wait_seconds=ack_wait,
            max_ack_pending=10_000,
        )
        entry = await ensure_job_stream(self.js, settings)
        self.created.append(entry)
        return entry

    async def publish(
        self, entry: protocol.RegistryEntry, items: list[dict[str, Any]], **params: Any
    ) -> None:
        job = protocol.JobRef(
            uid=entry.uid, namespace=entry.namespace, name=entry.name, pipeline=entry.pipeline
        )

        async def one(item: dict[str, Any]) -> None:
            body = protocol.Task(job=job, item=item, params=params).encode()
            headers = {protocol.MSG_ID_HEADER: protocol.task_msg_id(entry.uid, str(item["id"]))}
            await self.js.publish(entry.subject, body, headers=headers)

        for start in range(0, len(items), 250):
            await asyncio.gather(*(one(item) for item in items[start : start + 250]))

    async def register(self, entry: protocol.RegistryEntry) -> None:
        await register_job(await registry(self.js), entry)

    async def unregister(self, entry: protocol.RegistryEntry) -> None:
        await unregister_job(await registry(self.js), entry.pipeline, entry.uid)

    async def stream_messages(self, entry: protocol.RegistryEntry) -> int:
        """The job's task messages left in its pipeline's stream."""
        return await job_task_count(self.js, entry.pipeline, entry.uid)

    async def cleanup(self) -> None:
        kv = await registry(self.js)
        for entry in self.created:
            for call in (
                unregister_job(kv, entry.pipeline, entry.uid),
                delete_job_tasks(self.js, entry.pipeline, entry.uid),
                self.js.purge_stream(
                    protocol.RESULTS_STREAM, subject=protocol.results_subject(entry.pipeline, entry.uid)
                ),
            ):
                with contextlib.suppress(Exception):
                    await call


@pytest.fixture
async def jobs(nc: Client) -> AsyncIterator[Jobs]:
    js = nc.jetstream()
    await ensure_results_stream(js)
    await registry(js)
    helper = Jobs(js)
    yield helper
    await helper.cleanup()


def pipeline_name() -> str:
    return f"wt{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- real NATS, real processes


async def test_happy_path_every_item_gets_one_result_and_every_task_is_acked(
    nc: Client, jobs: Jobs, spawn_worker: SpawnWorker
) -> None:
    pipeline = pipeline_name()
    entry = await jobs.create(pipeline)
    n = 200
    sink = await ResultSink.start(nc, entry.uid)
    await jobs.publish(entry, [{"id": str(i), "n": i} for i in range(n)], scale=2)
    await jobs.register(entry)
    worker = spawn_worker(
        pipeline, "support.workers.handlers:mostly_ok", "--concurrency", "8", name="w-happy"
    )

    await sink.wait_items(n, 30, worker)
    await eventually(lambda: _is_zero(jobs.stream_messages(entry)), 10, interval=0.1, what="every task acked")
    results = sink.latest()
    assert set(results) == {str(i) for i in range(n)}
    assert len(sink.messages) == n  # one publish per item
    assert all(msg_id == protocol.result_msg_id(entry.uid, r.item_id) for r, msg_id in sink.messages)
    failed = {i for i, r in results.items() if r.outcome is protocol.Outcome.FAILED}
    assert failed == {str(i) for i in range(n) if str(i).endswith("7")}
    for item_id, result in results.items():
        assert result.job_uid == entry.uid and result.attempts == 1 and result.worker == "w-happy"
        if item_id in failed:
            assert result.error == f"item {item_id} is cursed"
        else:
            assert result.result == {
                "double": 2 * int(item_id),
                "attempt": 1,
                "params": {"scale": 2},
                "job": entry.name,
            }
    assert worker.proc.poll() is None, worker.log()


async def test_small_job_registered_after_a_huge_one_is_not_starved(
    nc: Client, jobs: Jobs, spawn_worker: SpawnWorker
) -> None:
    pipeline = pipeline_name()
    huge = await jobs.create(pipeline)
    small = await jobs.create(pipeline)
    huge_sink = await ResultSink.start(nc, huge.uid)
    small_sink = await ResultSink.start(nc, small.uid)
    await jobs.publish(huge, [{"id": str(i), "n": i} for i in range(3000)])
    await jobs.publish(small, [{"id": str(i), "n": i} for i in range(20)])
    await jobs.register(huge)
    worker = spawn_worker(pipeline, "support.workers.handlers:quick", "--concurrency", "8", "--batch", "16")
    await huge_sink.wait_items(50, 20, worker)
    await jobs.register(small)

    await small_sink.wait_items(20, 30, worker)
    await huge_sink.wait_items(3000, 40, worker)
    huge_done = sorted(r.finished_at for r in huge_sink.latest().values())
    small_last = max(r.finished_at for r in small_sink.latest().values())
    assert small_last < huge_done[-1]
    huge_before_small = sum(1 for t in huge_done if t <= small_last)
    small_first = min(r.finished_at for r in small_sink.latest().values())
    huge_while_small = sum(1 for t in huge_done if small_first <= t <= small_last)
    # Round-robin turns interleave the two jobs about 1:1 (~20 huge items while the 20 small ones
    # run); a worker that serves the oldest job greedily lets hundreds through.
    assert huge_while_small <= 100, f"{huge_while_small} huge items finished while the small job ran"
    assert huge_before_small < 1500, f"the small job finished after {huge_before_small} huge items"


async def test_sigterm_naks_unfinished_tasks_for_immediate_redelivery(
    nc: Client, jobs: Jobs, spawn_worker: SpawnWorker
) -> None:
    pipeline = pipeline_name()
    entry = await jobs.create(pipeline, max_deliver=5, ack_wait=60.0)
    sink = await ResultSink.start(nc, entry.uid)
    await jobs.publish(entry, [{"id": str(i)} for i in range(6)])
    await jobs.register(entry)
    first = spawn_worker(
        pipeline,
        "support.workers.handlers:sleepy",
        "--concurrency",
        "4",
        "--grace-seconds",
        "1",
        env={"TEST_HANDLER_SLEEP": "30"},
    )

    async def four_in_flight() -> bool:
        info = await jobs.js.consumer_info(entry.stream, entry.consumer)
        return int(info.num_ack_pending) == 4

    await eventually(four_in_flight, 15, interval=0.1, what=lambda: f"4 tasks in flight; log:\n{first.log()}")
    stopped_at = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert await first.wait_exit(10) == 0, first.log()
    assert time.monotonic() - stopped_at < 6, first.log()
    assert "NAK 4 unfinished task(s)" in first.log()
    assert sink.messages == []

    restarted_at = time.monotonic()
    second = spawn_worker(
        pipeline, "support.workers.handlers:sleepy", name="w2", env={"TEST_HANDLER_SLEEP": "0"}
    )
    await sink.wait_items(6, 15, second)
    assert time.monotonic() - restarted_at < 20  # far sooner than ack_wait (60 s)
    attempts = sorted(r.attempts for r in sink.latest().values())
    assert attempts == [1, 1, 2, 2, 2, 2]  # the four interrupted tasks came back at once


async def test_crash_between_result_and_ack_is_redelivered_and_deduplicated(
    nc: Client, jobs: Jobs, spawn_worker: SpawnWorker
) -> None:
    pipeline = pipeline_name()
    entry = await jobs.create(pipeline, max_deliver=5, ack_wait=5.0)
    n = 30
    sink = await ResultSink.start(nc, entry.uid)
    await jobs.publish(entry, [{"id": str(i), "n": i} for i in range(n)])
    await jobs.register(entry)
    crashing = spawn_worker(
        pipeline,
        "support.workers.handlers:quick",
        name="w-crash",
        env={CRASH_AFTER_RESULT_ENV: "12", "TEST_HANDLER_SLEEP": "0.02"},
    )
    assert await crashing.wait_exit(20) == 137, crashing.log()
    assert sink.count("12") == 1  # published (durable), never acked

    second = spawn_worker(pipeline, "support.workers.handlers:quick", name="w-after")
    await sink.wait_items(n, 20, second)
    await eventually(  # redelivered after ack_wait
        lambda: sink.count("12") >= 2, 15, what=lambda: f"12's result again; log:\n{second.log()}"
    )
    await eventually(lambda: _is_zero(jobs.stream_messages(entry)), 15, interval=0.1, what="every task acked")
    replays = [msg_id for r, msg_id in sink.messages if r.item_id == "12"]
    assert set(replays) == {protocol.result_msg_id(entry.uid, "12")}
    # The replay was de-duplicated by JetStream: the stream knows that message id already. (A
    # probe, not a count of stored messages: a collector elsewhere may be consuming the stream.)
    body = sink.latest()["12"].encode()
    probe = await jobs.js.publish(
        protocol.results_subject(entry.pipeline, entry.uid),
        body,
        headers={protocol.MSG_ID_HEADER: replays[0]},
    )
    assert probe.duplicate is True


async def test_oversized_malformed_and_exhausted_tasks_fail_cleanly(
    nc: Client, jobs: Jobs, spawn_worker: SpawnWorker
) -> None:
    pipeline = pipeline_name()
    entry = await jobs.create(pipeline, max_deliver=2, ack_wait=30.0)
    sink = await ResultSink.start(nc, entry.uid)
    await jobs.js.publish(entry.subject, b"{not json", headers={protocol.MSG_ID_HEADER: f"{entry.uid}:bad-1"})
    await jobs.js.publish(entry.subject, b"\xff\xfe garbage")  # no way to tell which item: TERM
    future = {"version": 99, "job": {"uid": entry.uid}, "item": {"id": "future-1"}}
    await jobs.js.publish(
        entry.subject, json.dumps(future).encode(), headers={protocol.MSG_ID_HEADER: f"{entry.uid}:future-1"}
    )
    await jobs.publish(
        entry,
        [{"id": "big", "kind": "big"}, {"id": "flaky", "kind": "flaky"}, {"id": "ok-1"}, {"id": "ok-2"}],
    )
    await jobs.register(entry)
    worker = spawn_worker(pipeline, "support.workers.handlers:tricky")

    await sink.wait_items(6, 20, worker)
    results = sink.latest()
    assert set(results) == {"bad-1", "big", "flaky", "ok-1", "ok-2", "future-1"}
    assert results["future-1"].outcome is protocol.Outcome.FAILED
    assert results["future-1"].error == "task refused: unsupported protocol version 99 (this side speaks 2)"
    assert results["bad-1"].outcome is protocol.Outcome.FAILED
    assert (results["bad-1"].error or "").startswith("malformed task: invalid task")
    assert results["big"].outcome is protocol.Outcome.FAILED
    assert f"over the limit of {protocol.MAX_RESULT_BYTES} bytes" in (results["big"].error or "")
    assert results["flaky"].outcome is protocol.Outcome.FAILED
    assert results["flaky"].error == "exhausted 2 deliveries: RuntimeError: flaky backend"
    assert results["flaky"].attempts == 2
    assert results["ok-1"].outcome is results["ok-2"].outcome is protocol.Outcome.SUCCEEDED

    async def settled() -> bool:
        info = await jobs.js.consumer_info(entry.stream, entry.consumer)
        return int(info.num_ack_pending) == 0 and int(info.num_pending) == 0

    await eventually(settled, 10, interval=0.1, what=lambda: f"every task settled; log:\n{worker.log()}")
    assert "TERM a malformed task" in worker.log()
    assert "refusing item future-1" in worker.log()
    assert worker.proc.poll() is None, worker.log()


async def test_job_removed_from_registry_is_no_longer_fetched(
    nc: Client, jobs: Jobs, spawn_worker: SpawnWorker
) -> None:
    pipeline = pipeline_name()
    entry = await jobs.create(pipeline, ack_wait=30.0)
    sink = await ResultSink.start(nc, entry.uid)
    await jobs.publish(entry, [{"id": str(i)} for i in range(100)])
    await jobs.register(entry)
    worker = spawn_worker(
        pipeline, "support.workers.handlers:quick", "--concurrency", "2", env={"TEST_HANDLER_SLEEP": "0.1"}
    )
    await sink.wait_items(6, 15, worker)
    await jobs.unregister(entry)
    await eventually(
        lambda: "left the registry" in worker.log(),
        10,
        what=lambda: f"the job to leave the registry; log:\n{worker.log()}",
    )
    await asyncio.sleep(0.5)  # the tasks in flight finish
    done = len(sink.latest())
    await asyncio.sleep(1.5)
    assert len(sink.latest()) == done
    assert done < 100 and await jobs.stream_messages(entry) == 100 - done
    assert worker.proc.poll() is None, worker.log()


async def _is_zero(value: Any) -> bool:
    return bool(await value == 0)


# --------------------------------------------------------------------------- the runner, no services


async def _process(
    handler: Any, events: Events, msg: FakeMsg, job: JobBinding | None = None, **kw: Any
) -> None:
    await process(handler, events, msg, job, **kw)


@pytest.mark.unit
async def test_result_is_published_before_the_task_is_acked() -> None:
    events: Events = []
    await _process(
        lambda ctx: {"seen": ctx.item_id, "attempt": ctx.attempt},
        events,
        FakeMsg(_task("i1"), events, delivered=2),
    )
    assert [e[0] for e in events] == ["publish", "ack", "flush"]
    _, subject, result, headers = events[0]
    assert subject == "mljob.results.p.u1" and headers == {"Nats-Msg-Id": "result:u1:i1"}
    assert result.outcome is protocol.Outcome.SUCCEEDED and result.result == {"seen": "i1", "attempt": 2}
    assert result.attempts == 2 and result.worker == "unit"


@pytest.mark.unit
async def test_failed_result_publish_is_retried_then_the_task_is_naked_at_once() -> None:
    events: Events = []
    await _process(lambda ctx: 1, events, FakeMsg(_task(), events), fail=True)
    assert [e[0] for e in events] == ["publish"] * 5 + ["nak"]
    assert events[-1] == ("nak", None)


@pytest.mark.unit
def test_publish_retry_backs_off_exponentially() -> None:
    assert [publish_retry_delay(0.2, tries) for tries in range(1, 7)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


@pytest.mark.unit
async def test_permanent_error_fails_the_item_and_acks() -> None:
    def handler(ctx: TaskContext) -> None:
        raise PermanentError("bad input")

    events: Events = []
    await _process(handler, events, FakeMsg(_task(), events))
    assert [e[0] for e in events] == ["publish", "ack", "flush"]
    result = published(events)[0]
    assert result.outcome is protocol.Outcome.FAILED and result.error == "bad input"


@pytest.mark.unit
async def test_transient_error_naks_with_growing_delay_then_fails_when_exhausted() -> None:
    async def handler(ctx: TaskContext) -> None:
        raise RuntimeError("backend down")

    for delivered, expected in ((1, 2), (2, 4)):
        events: Events = []
        await _process(
            handler, events, FakeMsg(_task(), events, delivered=delivered), _binding(max_deliver=3)
        )
        assert events == [("nak", expected)]
    events = []
    await _process(handler, events, FakeMsg(_task(), events, delivered=3), _binding(max_deliver=3))
    assert [e[0] for e in events] == ["publish", "ack", "flush"]
    result = published(events)[0]
    assert result.error == "exhausted 3 deliveries: RuntimeError: backend down" and result.attempts == 3
    assert nak_delay(10) == 30


@pytest.mark.unit
async def test_oversized_and_unserialisable_results_become_failed_results() -> None:
    for value, expected in (
        ("x" * (protocol.MAX_RESULT_BYTES + 1), "over the limit of"),
        ({"when": object()}, "not JSON-serialisable"),
    ):
        events: Events = []
        await _process(lambda ctx, v=value: v, events, FakeMsg(_task(), events))
        assert [e[0] for e in events] == ["publish", "ack", "flush"]
        result = published(events)[0]
        assert result.outcome is protocol.Outcome.FAILED and expected in (result.error or "")


@pytest.mark.unit
async def test_malformed_task_fails_its_item_or_is_terminated() -> None:
    events: Events = []
    msg = FakeMsg(b"{}", events, headers={"Nats-Msg-Id": "u1:item-9"})
    await _process(lambda ctx: 1, events, msg)
    assert [e[0] for e in events] == ["publish", "ack", "flush"]
    assert published(events)[0].item_id == "item-9"
    events.clear()
    await _process(lambda ctx: 1, events, FakeMsg(b"junk", events))
    assert events == [("term",)]
    assert recover_ids("mljob.tasks.p.u1", {"Nats-Msg-Id": "u1:a:b"}) == ("u1", "a:b")
    assert recover_ids("mljob.tasks.p.u1", {"Nats-Msg-Id": "u2:a"}) is None
    assert recover_ids("mljob.tasks.p.u1", {"Nats-Msg-Id": "u1:"}) is None
    assert recover_ids("other.p.u1", {"Nats-Msg-Id": "u1:a"}) is None


@pytest.mark.unit
async def test_task_of_an_unknown_version_is_refused_with_a_failed_result_then_terminated() -> None:
    handled: list[str] = []
    job = {"uid": "u1", "namespace": "ns", "name": "job", "pipeline": "p"}
    future = json.dumps({"version": 99, "job": job, "item": {"id": "i7"}, "params": {}}).encode()
    for headers in ({"Nats-Msg-Id": "u1:i7"}, None):  # item id from the header, else from the body
        events: Events = []
        await _process(
            lambda ctx: handled.append(ctx.item_id), events, FakeMsg(future, events, headers=headers)
        )
        assert [e[0] for e in events] == ["publish", "term", "flush"]  # TERM, after the result is durable
        result = published(events)[0]
        assert (result.job_uid, result.item_id, result.outcome) == ("u1", "i7", protocol.Outcome.FAILED)
        assert result.error == "task refused: unsupported protocol version 99 (this side speaks 2)"
    assert handled == []  # the handler never saw a task it cannot read

    events = []  # nothing names the item: TERM without a result
    anonymous = json.dumps({"version": 2, "job": job, "item": {}}).encode()
    await _process(lambda ctx: 1, events, FakeMsg(anonymous, events))
    assert events == [("term",)]

    events = []  # the refusal's result could not be sent: NAK, the task comes back
    await _process(
        lambda ctx: 1, events, FakeMsg(future, events, headers={"Nats-Msg-Id": "u1:i7"}), fail=True
    )
    assert [e[0] for e in events] == ["publish"] * 5 + ["nak"]


@pytest.mark.unit
def test_task_version_is_required_and_checked() -> None:
    job = protocol.JobRef(uid="u1", namespace="ns", name="job", pipeline="p")
    current = protocol.Task(job=job, item={"id": "a"})
    assert protocol.decode_task(current.encode()) == current
    unversioned = current.model_dump(mode="json")
    del unversioned["version"]
    for body, error in (
        (unversioned, protocol.MalformedMessage),
        ({**unversioned, "version": str(protocol.PROTOCOL_VERSION)}, protocol.MalformedMessage),
        ({**unversioned, "version": 1}, protocol.UnsupportedVersion),  # version 1: per-job streams
        ({**unversioned, "version": protocol.PROTOCOL_VERSION + 1}, protocol.UnsupportedVersion),
        ({"version": 1}, protocol.UnsupportedVersion),  # the version is judged before the shape
    ):
        with pytest.raises(error):
            protocol.decode_task(json.dumps(body).encode())


@pytest.mark.unit
async def test_heartbeats_while_running_and_nak_when_cancelled() -> None:
    started = asyncio.Event()

    async def slow(ctx: TaskContext) -> None:
        started.set()
        await asyncio.sleep(30)

    events: Events = []
    task = asyncio.create_task(_process(slow, events, FakeMsg(_task(), events), _binding(ack_wait=1.5)))
    await started.wait()
    await asyncio.sleep(1.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events.count(("wpi",)) >= 2
    assert events[-1] == ("nak", None) and ("ack",) not in events


@pytest.mark.unit
def test_load_handler() -> None:
    assert load_handler("os.path:join") is os.path.join
    for spec, message in (
        ("os.path.join", "must look like"),
        ("no_such_module_xyz:f", "cannot import"),
        ("os.path:nope", "no attribute"),
        ("os:sep", "not callable"),
    ):
        with pytest.raises(HandlerLoadError, match=message):
            load_handler(spec)
