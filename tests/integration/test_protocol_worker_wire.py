"""What docs/protocol.md says a worker does with unusual tasks, on the wire: the reference worker
(`mljob worker`, a real process with the stack's worker identity) against the stack's NATS.

Tasks are published as raw JSON, as any producer could write them. Results are observed with a
core subscription (every publish), TERMs with the server's MSG_TERMINATED advisories, so "fail
the item, then TERM" and "fail the item, then ACK" are told apart by what the server saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from mljob import protocol
from mljob.adapters.jetstream import (
    JobStreamSettings,
    delete_job_tasks,
    ensure_job_stream,
    ensure_results_stream,
    register_job,
    registry,
    unregister_job,
)
from support.stack import StackEnv

ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parents[1]
WAIT_SECONDS = 30.0  # an upper bound for waiting, never a timing assertion
TERMINATED = "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED"


@dataclass
class Observed:
    """Every result published for one job (by item id, with its subject) and every TERM."""

    results: dict[str, tuple[str, protocol.Result]] = field(default_factory=dict)
    terminated: set[int] = field(default_factory=set)  # stream sequences
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_result(self, msg: Msg) -> None:
        result = protocol.decode_result(msg.data)
        self.results[result.item_id] = (msg.subject, result)
        self.changed.set()

    async def on_terminated(self, msg: Msg) -> None:
        self.terminated.add(int(json.loads(msg.data)["stream_seq"]))
        self.changed.set()

    async def until(self, items: set[str], terms: int) -> None:
        try:
            async with asyncio.timeout(WAIT_SECONDS):
                while not (items <= set(self.results) and len(self.terminated) >= terms):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            seen = {i: (r.outcome.value, r.error) for i, (_, r) in self.results.items()}
            pytest.fail(
                f"waited for results of {sorted(items)} and {terms} TERMs; saw {seen}, {self.terminated}"
            )


@dataclass
class Job:
    nc: Client
    entry: protocol.RegistryEntry
    seqs: dict[str, int] = field(default_factory=dict)

    async def publish(self, item_id: str, body: str, subject: str | None = None) -> None:
        ack = await self.nc.jetstream().publish(
            subject or self.entry.subject,
            body.encode(),
            headers={protocol.MSG_ID_HEADER: protocol.task_msg_id(self.entry.uid, item_id)},
        )
        self.seqs[item_id] = ack.seq

    def task(self, item: str, version: str = "2", job: dict[str, str] | None = None, extra: str = "") -> str:
        ref = {
            "uid": self.entry.uid,
            "namespace": self.entry.namespace,
            "name": self.entry.name,
            "pipeline": self.entry.pipeline,
        }
        return f'{{"version": {version}, "job": {json.dumps({**ref, **(job or {})})}, "item": {item}{extra}}}'


@pytest.fixture
async def job(nc: Client) -> AsyncIterator[Job]:
    js = nc.jetstream()
    await ensure_results_stream(js)
    kv = await registry(js)
    pipeline, uid = f"pw{uuid.uuid4().hex[:10]}", str(uuid.uuid4())
    entry = await ensure_job_stream(
        js, JobStreamSettings(uid=uid, namespace="ns", name="wire", pipeline=pipeline, max_deliver=3)
    )
    yield Job(nc, entry)
    for call in (
        unregister_job(kv, pipeline, uid),
        delete_job_tasks(js, pipeline, uid),
        js.purge_stream(protocol.RESULTS_STREAM, subject=protocol.results_subject(pipeline, uid)),
    ):
        with contextlib.suppress(Exception):
            await call


@pytest.fixture
async def observed(nc: Client, job: Job) -> AsyncIterator[Observed]:
    seen = Observed()
    subs = [
        await nc.subscribe(protocol.results_subject("*", job.entry.uid), cb=seen.on_result),
        await nc.subscribe(f"{TERMINATED}.{job.entry.stream}.{job.entry.consumer}", cb=seen.on_terminated),
    ]
    await nc.flush()
    yield seen
    for sub in subs:
        await sub.unsubscribe()


@pytest.fixture
def worker(stack: StackEnv, job: Job, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`mljob worker` of the job's pipeline, as the worker identity; killed at teardown."""
    env = stack.as_env("worker")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "mljob.cli.main", "worker", "--pipeline", job.entry.pipeline]
    cmd += ["--handler", "support.workers.handlers:mostly_ok", "--worker-id", "wire-worker"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    yield proc
    proc.kill()
    proc.wait(timeout=10)
    print(log.read_text(errors="replace"))


async def start(job: Job) -> None:
    await register_job(await registry(job.nc.jetstream()), job.entry)


async def test_tasks_of_another_version_type_are_failed_then_terminated(
    job: Job, observed: Observed, worker: Any
) -> None:
    """The version rule: `"2"`, `2.0` and `true` are refused like 3 (failed result, TERM)."""
    versions = {"v-string": '"2"', "v-float": "2.0", "v-bool": "true", "v-three": "3"}
    for item_id, version in versions.items():
        await job.publish(item_id, job.task(f'{{"id": "{item_id}", "n": 1}}', version=version))
    await job.publish("ok", job.task('{"id": "ok", "n": 1}'))
    await start(job)
    await observed.until({*versions, "ok"}, terms=len(versions))
    for item_id, version in versions.items():
        _, result = observed.results[item_id]
        assert result.outcome is protocol.Outcome.FAILED
        assert result.error == f"task refused: unsupported protocol version {version} (this side speaks 2)"
    assert observed.terminated == {job.seqs[i] for i in versions}  # "ok" was ACKed, not TERMed
    assert observed.results["ok"][1].outcome is protocol.Outcome.SUCCEEDED


async def test_null_params_odd_item_ids_and_the_result_subject(
    job: Job, observed: Observed, worker: Any
) -> None:
    """`params: null` is `{}`; an item id that is not a string fails the item (id from
    Nats-Msg-Id) and is ACKed; the result goes on the registry entry's pipeline whatever the
    task's `job.pipeline` says; a NUL in a result is published as is (the collector decides)."""
    await job.publish("p-null", job.task('{"id": "p-null", "n": 1}', extra=', "params": null'))
    await job.publish("id-frac", job.task('{"id": 1.5, "n": 1}'))
    await job.publish("id-exp", job.task('{"id": 1e3, "n": 1}'))
    await job.publish(
        "elsewhere", job.task('{"id": "elsewhere", "n": 2}', job={"pipeline": "other-pipeline"})
    )
    await job.publish("nul", job.task('{"id": "nul", "n": 3}', extra=', "params": {"text": "a\\u0000b"}'))
    await start(job)
    await observed.until({"p-null", "id-frac", "id-exp", "elsewhere", "nul"}, terms=0)
    expected_subject = protocol.results_subject(job.entry.pipeline, job.entry.uid)
    assert {subject for subject, _ in observed.results.values()} == {expected_subject}

    _, p_null = observed.results["p-null"]
    assert p_null.outcome is protocol.Outcome.SUCCEEDED
    assert isinstance(p_null.result, dict) and p_null.result["params"] == {}
    for item_id, shown in (("id-frac", "1.5"), ("id-exp", "1000.0")):
        _, failed = observed.results[item_id]
        assert failed.outcome is protocol.Outcome.FAILED
        assert (
            failed.error == f"malformed task: invalid task: item.id must be a non-empty string, got {shown}"
        )
    assert observed.results["elsewhere"][1].outcome is protocol.Outcome.SUCCEEDED
    _, nul = observed.results["nul"]
    assert isinstance(nul.result, dict) and nul.result["params"] == {"text": "a\x00b"}
    consumer = await job.nc.jetstream().consumer_info(job.entry.stream, job.entry.consumer)
    assert (consumer.num_pending, observed.terminated) == (0, set())
