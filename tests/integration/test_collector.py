"""The result collector end to end against REAL NATS JetStream, Redis and Postgres.

The shared results stream and its `collector` durable belong to whatever else runs on the NATS
server, so every test here creates its own results stream and durable and points the Collector
at them. Redis is isolated by key prefix (or a private redis-server), Postgres by schema.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from redis.asyncio import Redis

from mljob import protocol
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore, make_pool
from mljob.collector.results import Collector
from mljob_dev.devstack.stack import free_port
from support.collecting import (
    FAILED,
    OK,
    ResultsStream,
    body,
    collector_for,
    dead_letters,
    dispatched,
    drained_listener,
    make_results_stream,
    running,
    settled,
    stream_messages,
)
from support.stack import ROOT, StackEnv
from support.waiting import eventually, wait_for

# --- a private redis-server ------------------------------------------------------------------


class RedisServer:
    """A private redis-server that a test may kill and restart (AOF keeps data across restarts)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found (apt-get install redis-server)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._pong, 20, interval=0.05, what="the private redis-server to answer PING")

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


# --- tests ------------------------------------------------------------------------------------


async def test_end_to_end_duplicates_and_malformed(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    results: ResultsStream,
) -> None:
    uid = str(uuid.uuid4())
    items = [f"img-{n:04d}" for n in range(500)]
    failed = {items[n] for n in range(0, 500, 10)}
    assert await dispatched(state, store, uid, items)
    drained = await drained_listener(nc, uid)
    callbacks: list[tuple[str, int | None]] = []

    async def on_drained(job: str) -> None:
        counts = await state.counts(job)
        callbacks.append((job, counts.pending if counts else None))

    malformed = [
        b"\xff\xfe not utf-8",
        b"{not json",
        json.dumps({"job_uid": uid, "item_id": "img-x"}).encode(),  # no outcome
    ]
    subject = results.subject(uid)
    collector = collector_for(js, nc, state, store, results, batch=64, on_drained=on_drained)
    async with running(collector):
        for n, item in enumerate(items):
            await js.publish(subject, body(uid, item, FAILED if item in failed else OK, result={"n": n}))
            if n in (100, 300, 499):
                await js.publish(subject, malformed[(100, 300, 499).index(n)])
        for item in items[:50]:  # replays, e.g. a worker that re-posted after a lost reply
            await js.publish(subject, body(uid, item, FAILED if item in failed else OK))
        await eventually(lambda: settled(js, results), 60, what="every message acked")
        await eventually(lambda: asyncio.sleep(0, result=bool(drained and callbacks)), 10, what="drained")

    assert await store.count(uid) == (500, 50)
    outcomes = await store.item_outcomes(uid)
    assert outcomes == {item: ("failed" if item in failed else "succeeded") for item in items}
    counts = await state.counts(uid)
    assert counts is not None
    assert (counts.total, counts.pending, counts.failed, counts.succeeded) == (500, 0, 50, 450)
    assert counts.last_activity is not None and abs(counts.last_activity - time.time()) < 120
    assert await state.failed_ids(uid) == failed
    letters = await dead_letters(store)
    assert [(src, subj, payload) for src, subj, payload, _ in letters] == [
        ("collector", subject, payload) for payload in malformed
    ]
    assert all(reason.startswith("invalid result") for *_, reason in letters)
    assert "UTF-8" in letters[0][3]
    info = await js.consumer_info(results.stream, results.consumer)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    assert await stream_messages(js, results) == 0
    assert drained[0] == protocol.drained_subject(uid)
    assert callbacks[0] == (uid, 0)  # announced only once nothing was pending


async def test_loops_store_batches_at_once_and_count_exactly(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    results: ResultsStream,
) -> None:
    """MLJOB_COLLECTOR_LOOPS: two loops share the consumer, each with its own fetches, so one
    batch is stored while another waits for Postgres; replays across loops still count once."""
    uid = str(uuid.uuid4())
    items = [f"img-{n:04d}" for n in range(400)]
    assert await dispatched(state, store, uid, items)
    subject = results.subject(uid)
    for item in [*items, *items[:100]]:  # 100 replays, which may land in the other loop's batch
        await js.publish(subject, body(uid, item, OK))
    upsert, storing, most = store.upsert, 0, 0

    async def slow_upsert(rows: list[protocol.Result]) -> Any:
        nonlocal storing, most
        storing += 1
        most = max(most, storing)
        try:
            await asyncio.sleep(0.2)  # a Postgres round trip long enough for the other loop to fetch
            return await upsert(rows)
        finally:
            storing -= 1

    store.upsert = slow_upsert  # type: ignore[method-assign]
    try:
        async with running(collector_for(js, nc, state, store, results, batch=50, loops=2)):
            await eventually(lambda: settled(js, results), 60, what="every message acked")
    finally:
        store.upsert = upsert  # type: ignore[method-assign]
    assert most == 2, f"at most {most} batch(es) were stored at once"
    assert await store.count(uid) == (400, 0)
    counts = await state.counts(uid)
    assert counts is not None
    assert (counts.total, counts.pending, counts.succeeded) == (400, 0, 400)


async def test_redis_down_mid_flight_nothing_acked_then_exact(
    js: JetStreamContext,
    nc: NATS,
    store: ResultsStore,
    results: ResultsStream,
    redis_server: RedisServer,
    prefix: str,
) -> None:
    client = Redis.from_url(
        redis_server.url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2
    )
    state = JobState(client, prefix=prefix)
    uid = str(uuid.uuid4())
    items = [f"i{n:03d}" for n in range(100)]
    failed = {items[n] for n in range(0, 100, 5)}
    assert await dispatched(state, store, uid, items)
    drained = await drained_listener(nc, uid)
    subject = results.subject(uid)

    def result_of(item: str) -> bytes:
        return body(uid, item, FAILED if item in failed else OK)

    try:
        async with running(collector_for(js, nc, state, store, results, batch=32)):
            for item in items[:40]:
                await js.publish(subject, result_of(item))
            await eventually(lambda: settled(js, results), 60, what="first 40 acked")
            counts = await state.counts(uid)
            assert counts is not None and counts.pending == 60

            redis_server.kill()
            for item in items[40:]:
                await js.publish(subject, result_of(item))
            for item in items[:10]:
                await js.publish(subject, result_of(item))
            await asyncio.sleep(4)
            # Redis is down: nothing of the 70 may be acked (a work-queue stream drops acked ones).
            assert await stream_messages(js, results) == 70
            info = await js.consumer_info(results.stream, results.consumer)
            assert info.num_pending + info.num_ack_pending == 70
            assert not drained

            redis_server.start()  # same port, same data; the script cache is empty now
            await eventually(lambda: settled(js, results), 60, what="all acked after Redis returned")
            await eventually(lambda: asyncio.sleep(0, result=bool(drained)), 10, what="drained")
    finally:
        await client.aclose()

    counts = await state.counts(uid)
    assert counts is not None
    assert (counts.total, counts.pending, counts.failed) == (100, 0, 20)
    assert await state.failed_ids(uid) == failed
    assert await store.count(uid) == (100, 20)
    assert await dead_letters(store) == []


async def test_postgres_down_nothing_acked_nothing_recorded(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    results: ResultsStream,
) -> None:
    uid = str(uuid.uuid4())
    items = [f"p{n}" for n in range(20)]
    await dispatched(state, store, uid, items)
    for n, item in enumerate(items):
        await js.publish(results.subject(uid), body(uid, item, FAILED if n < 3 else OK))

    dead_pool = make_pool(
        f"postgresql://postgres@127.0.0.1:{free_port()}/mljob", timeout=1.0, connect_timeout=1
    )
    await dead_pool.open(wait=False)
    try:
        broken = collector_for(js, nc, state, ResultsStore(dead_pool), results)
        sub = await js.pull_subscribe_bind(durable=results.consumer, stream=results.stream)
        msgs: list[Msg] = []
        while len(msgs) < 20:
            msgs += await sub.fetch(20 - len(msgs), timeout=2)
        assert await broken.process(msgs) is False
        await sub.unsubscribe()
    finally:
        await dead_pool.close()
    # Postgres first: Redis was not touched, nothing acked.
    assert await stream_messages(js, results) == 20
    counts = await state.counts(uid)
    assert counts is not None and counts.pending == 20
    assert await store.count(uid) == (0, 0)

    async with running(collector_for(js, nc, state, store, results)):
        await eventually(lambda: settled(js, results), 60, what="redelivered batch acked")
    counts = await state.counts(uid)
    assert counts is not None and (counts.pending, counts.failed) == (0, 3)
    assert await store.count(uid) == (20, 3)


async def test_late_result_after_cleanup_is_stored_acked_and_creates_no_keys(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    results: ResultsStream,
    redis: Redis,
    prefix: str,
) -> None:
    uid = str(uuid.uuid4())  # dispatched, and its Redis state already cleaned up (row 10)
    await store.register_items(uid, ["a", "b", "c"])
    drained = await drained_listener(nc, uid)
    for item, outcome in (("a", OK), ("b", FAILED), ("c", OK)):
        await js.publish(results.subject(uid), body(uid, item, outcome))
    async with running(collector_for(js, nc, state, store, results)):
        await eventually(lambda: settled(js, results), 60, what="acked")
        await asyncio.sleep(0.3)
    assert await store.count(uid) == (3, 1)
    assert [k async for k in redis.scan_iter(match=f"{prefix}:*{uid}*")] == []
    assert await state.counts(uid) is None
    assert drained == []


async def test_result_postgres_refuses_is_dead_lettered_alone(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    results: ResultsStream,
) -> None:
    uid = str(uuid.uuid4())
    await dispatched(state, store, uid, ["a", "b"])
    drained = await drained_listener(nc, uid)
    poison = json.dumps(
        {
            "version": protocol.PROTOCOL_VERSION,
            "job_uid": uid,
            "item_id": "nul\u0000id",
            "outcome": "succeeded",
        }
    ).encode()
    await js.publish(results.subject(uid), body(uid, "a", OK))
    await js.publish(results.subject(uid), poison)
    await js.publish(results.subject(uid), body(uid, "b", FAILED))
    async with running(collector_for(js, nc, state, store, results)):
        await eventually(lambda: settled(js, results), 60, what="acked")
        await eventually(lambda: asyncio.sleep(0, result=bool(drained)), 10, what="drained")
    assert await store.count(uid) == (2, 1)
    letters = await dead_letters(store)
    assert len(letters) == 1 and letters[0][2] == poison
    assert letters[0][3].startswith("rejected by Postgres")
    counts = await state.counts(uid)
    assert counts is not None and (counts.pending, counts.failed) == (0, 1)


class CrashesBeforeAck(Collector):
    """Records everything, then 'crashes' before acking or announcing."""

    async def _ack(self, msg: Msg) -> None:
        return None

    async def _announce(self, uid: str) -> None:
        return None


async def test_crash_between_record_and_ack_redelivers_and_counts_once(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
) -> None:
    rs = await make_results_stream(js, ack_wait=2.0)
    try:
        uid = str(uuid.uuid4())
        items = [f"c{n}" for n in range(30)]
        await dispatched(state, store, uid, items)
        drained = await drained_listener(nc, uid)
        for n, item in enumerate(items):
            await js.publish(rs.subject(uid), body(uid, item, FAILED if n % 3 == 0 else OK))
        crashing = CrashesBeforeAck(
            js, nc, state, store, stream=rs.stream, consumer=rs.consumer, subject_prefix=rs.prefix,
            fetch_timeout=0.5,
        )  # fmt: skip
        async with running(crashing):
            await eventually(lambda: state_pending_is(state, uid, 0), 60, what="recorded")
        assert await stream_messages(js, rs) == 30  # recorded, never acked
        assert drained == []

        async with running(collector_for(js, nc, state, store, rs)):
            await eventually(lambda: settled(js, rs), 60, what="redeliveries acked")
            # The replay finds nothing pending and re-announces what the crash swallowed.
            await eventually(lambda: asyncio.sleep(0, result=bool(drained)), 10, what="drained")
        counts = await state.counts(uid)
        assert counts is not None and (counts.total, counts.pending, counts.failed) == (30, 0, 10)
        assert await store.count(uid) == (30, 10)
    finally:
        await js.delete_stream(rs.stream)


async def state_pending_is(state: JobState, uid: str, pending: int) -> bool:
    counts = await state.counts(uid)
    return counts is not None and counts.pending == pending


@pytest.mark.parametrize("down", ["nats", "redis", "postgres"])
def test_cli_names_an_unreachable_dependency_once(stack: StackEnv, pg_schema: str, down: str) -> None:
    closed = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "MLJOB_NATS_URL": f"nats://{closed}" if down == "nats" else stack.nats_url,
        "MLJOB_POSTGRES_DSN": f"postgresql://postgres@{closed}/mljob"
        if down == "postgres"
        else stack.postgres_dsn,
        "MLJOB_REDIS_URL": f"redis://{closed}/0" if down == "redis" else stack.redis_url,
        "PYTHONPATH": str(ROOT / "operator"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "mljob.cli.main", "collector", "--postgres-schema", pg_schema],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(6)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = out + err
    name = {"nats": "NATS", "redis": "Redis", "postgres": "Postgres"}[down]
    lines = [line for line in logs.splitlines() if f"cannot reach {name} at {closed}" in line]
    assert len(lines) == 1, logs
    assert "Traceback" not in logs
    assert proc.returncode == 0, logs
