"""`JobState` on a real Redis Cluster (issue 15, "Scale out" section 2): three primaries with a
replica each, the operator's client from `redis_state.connect(..., cluster=True)`.

Every method with jobs on every primary; the bounded wait of the cluster client (which itself
would raise MaxConnectionsError at once); a primary killed in the middle of a stream of record
batches, with the promoted replica's empty script cache. The failover test runs last: it leaves
the module's cluster with one primary fewer replica.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    MaxConnectionsError,
    RedisClusterException,
    TimeoutError,
)

from mljob.adapters import redis_state
from mljob.adapters.redis_state import JobState, RecordOutcome, RecordStatus
from mljob_dev.devstack import redis_cluster
from support.redis_cluster import Cluster, primary_of, scripts_cached, started_cluster
from support.stack import StackEnv
from support.waiting import eventually

#: What a call may meet while a primary is down and until its replica is promoted.
FAILOVER_ERRORS = (ConnectionError, ClusterDownError, TimeoutError, RedisClusterException)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with started_cluster(tmp_path_factory) as started:
        yield started


def url_of(cluster: Cluster) -> str:
    return cluster[0].env["MLJOB_REDIS_CLUSTER_URL"]


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[RedisCluster]:
    opened = redis_state.connect(url_of(cluster), 32, cluster=True, decode_responses=True)
    assert isinstance(opened, RedisCluster)
    yield opened
    await opened.aclose()


@pytest.fixture
def state(client: RedisCluster) -> JobState:
    return JobState(client, prefix=f"t{uuid.uuid4().hex[:8]}")


def owner_port(client: RedisCluster, state: JobState, uid: str) -> int:
    return int(client.get_node_from_key(state.keys(uid).total).port)


def primary_ports(client: RedisCluster) -> set[int]:
    return {int(node.port) for node in client.get_primaries()}


async def test_every_method_with_jobs_on_every_primary(client: RedisCluster, state: JobState) -> None:
    await client.ping()  # maps the slots
    uids = [str(uuid.uuid4()) for _ in range(300)]
    owners = {uid: owner_port(client, state, uid) for uid in uids}
    assert set(owners.values()) == primary_ports(client), "300 jobs spread over all three primaries"
    ids = [f"item-{i}" for i in range(5)]

    assert all(await asyncio.gather(*(state.initialize(uid, ids, chunk=2) for uid in uids)))
    assert not await state.initialize(uids[0], ids)
    counts = await state.counts_many(uids)
    assert {(c.total, c.pending, c.failed, c.last_activity) for c in counts.values() if c} == {
        (5, 5, 0, None)
    }
    assert len(counts) == 300

    # One batch across every job (and a job without state): one script per job, split per node.
    missing = str(uuid.uuid4())
    batch = [(uid, item, item == "item-1") for uid in uids for item in ("item-0", "item-1")]
    out = await state.record([*batch, (missing, "x", False)], now=10.0)
    assert [(o.uid, o.item_id) for o in out] == [(u, i) for u, i, _ in batch] + [(missing, "x")]
    assert Counter(o.status for o in out) == {RecordStatus.NEW: 600, RecordStatus.NO_STATE: 1}
    assert {o.pending_left for o in out if o.item_id == "item-1"} == {3}
    replayed = await state.record(batch, now=11.0)
    assert {o.status for o in replayed} == {RecordStatus.DUPLICATE}

    # The script cache of every primary flushed: the calls are redone after loading it again.
    await client.script_flush()
    assert await state.mark_failed(uids[0], ["item-2", "item-0"], now=12.0) == 1
    counts = await state.counts_many([*uids, missing])
    assert counts[missing] is None
    first = counts[uids[0]]
    assert first is not None and (first.pending, first.failed, first.last_activity) == (2, 2, 12.0)
    assert {(c.pending, c.failed, c.last_activity) for u, c in counts.items() if c and u != uids[0]} == {
        (3, 1, 10.0)
    }
    assert await state.failed_ids(uids[0]) == {"item-1", "item-2"}

    # Rebuilt state appears whole (staging keys share the job's slot, or the script would fail).
    rebuilt = str(uuid.uuid4())
    assert await state.restore(rebuilt, 4, ["a", "b"], ["c"], now=20.0)
    assert not await state.restore(rebuilt, 4, ["a"], [], now=21.0)
    again = await state.counts(rebuilt)
    assert again is not None and (again.total, again.pending, again.failed) == (4, 2, 1)

    # The orphan sweep's scan sees the jobs of every primary, with their idle time.
    stored = await state.scan_jobs(count=100)
    assert set(stored) == {*uids, rebuilt}
    assert all(job.idle_seconds is not None and job.idle_seconds < 60 for job in stored.values())
    assert stored[uids[0]].keys == tuple(sorted(state.keys(uids[0]).all()))
    cheap = await state.scan_jobs(idle=False)
    measured = await state.measure_idle({uid: cheap[uid] for uid in uids[:50]})
    assert all(job.idle_seconds is not None for job in measured.values())

    await asyncio.gather(*(state.delete(uid) for uid in [*uids, rebuilt]))
    await state.delete(rebuilt)  # idempotent
    assert await state.scan_jobs() == {}


async def test_many_callers_wait_for_a_turn_and_fail_clearly_only_past_the_wait(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's cluster client raises MaxConnectionsError as soon as a node's connections are
    all taken (redis-py #3135); the operator's client makes the others wait instead."""
    client = redis_state.connect(url_of(cluster), max_connections=8, cluster=True)
    assert isinstance(client, RedisCluster)
    state = JobState(client, prefix=f"t{uuid.uuid4().hex[:8]}")
    uids = [str(uuid.uuid4()) for _ in range(30)]
    try:
        await asyncio.gather(*(state.initialize(uid, ["a", "b"]) for uid in uids))
        calls = [state.counts(uids[n % len(uids)]) for n in range(400)]
        calls += [state.record([(uids[n % len(uids)], "a", False)], now=1.0) for n in range(100)]
        results = await asyncio.gather(*calls)
        assert len(results) == 500
        assert {(c.total, c.pending + c.failed) for c in results[:400] if c is not None} == {(2, 2)}
        assert max(len(node._connections) for node in client.get_nodes()) <= 8
    finally:
        await asyncio.gather(*(state.delete(uid) for uid in uids))
        await client.aclose()

    monkeypatch.setattr(redis_state, "POOL_WAIT_SECONDS", 0.3)
    one = redis_state.connect(url_of(cluster), max_connections=1, cluster=True, socket_timeout=5)
    try:
        await one.ping()
        held = asyncio.create_task(one.blpop([f"t:{{{uuid.uuid4()}}}:nothing"], timeout=2))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(MaxConnectionsError, match="MLJOB_REDIS_MAX_CONNECTIONS"):
            await one.ping()
        assert 0.2 < time.monotonic() - started < 1.5
        assert await held is None  # the call holding the one turn was not disturbed
        assert await one.ping()
    finally:
        await one.aclose()


async def test_a_single_node_named_a_cluster_is_refused_naming_the_setting(stack: StackEnv) -> None:
    """Start-up's permanent check: retrying cannot turn a single node into a cluster."""
    client = redis_state.connect(stack.redis_url, 2, cluster=True)
    try:
        with pytest.raises(RedisClusterException) as err:
            await client.ping()
        assert redis_state.refused("127.0.0.1:1")(err.value) == (
            "Redis at 127.0.0.1:1 is not a Redis Cluster: unset MLJOB_REDIS_CLUSTER"
        )
    finally:
        await client.aclose()


async def test_a_killed_primary_mid_stream_loses_and_doubles_nothing(
    cluster: Cluster, client: RedisCluster, state: JobState
) -> None:
    stack, nodes = cluster
    await client.ping()
    uids = [str(uuid.uuid4()) for _ in range(60)]
    assert {owner_port(client, state, uid) for uid in uids} == primary_ports(client)
    items = [f"i{n}" for n in range(100)]
    await asyncio.gather(*(state.initialize(uid, items) for uid in uids))
    victim = next(n for n in nodes if n.port == owner_port(client, state, uids[0]))
    heir = next(
        n for n in nodes if redis_cluster.role(n.port) == "slave" and primary_of(n.port) == victim.port
    )
    # A script cache is not replicated: the heir will answer NoScriptError to the first EVALSHA.
    await state.record([(uids[0], "i0", False)], now=0.0)
    assert scripts_cached(victim.port, redis_state._RECORD_LUA)
    assert not scripts_cached(heir.port, redis_state._RECORD_LUA)
    batches = [
        [(uid, item, item.endswith("7")) for uid in uids for item in items[start : start + 5]]
        for start in range(0, len(items), 5)
    ]
    outcomes: list[RecordOutcome] = []
    failures: Counter[str] = Counter()
    killed_at = recovered_at = 0.0
    for n, batch in enumerate(batches):
        if n == 8:
            # What the victim acknowledged is on its replica (a primary lost with unreplicated
            # writes is the ledger's to heal: actions/state rebuilds from it).
            assert await client.execute_command(
                "WAIT", 1, 5000, target_nodes=client.get_node(host="127.0.0.1", port=victim.port)
            )
            redis_cluster.kill(stack, victim)
            killed_at = time.monotonic()
        while True:
            try:
                outcomes += await state.record(batch, now=float(n))
                break
            except FAILOVER_ERRORS as err:  # what the collector meets: the batch is redelivered
                failures[type(err).__name__] += 1
                assert time.monotonic() - killed_at < 30, f"no recovery after {failures}"
                await asyncio.sleep(0.2)
        if n == 8:
            recovered_at = time.monotonic()
    print(f"recording resumed {recovered_at - killed_at:.1f}s after the kill; failures: {dict(failures)}")
    assert failures, "calls failed while the primary was down"
    assert redis_cluster.role(heir.port) == "master"
    new = Counter((o.uid, o.item_id) for o in outcomes if o.status is RecordStatus.NEW)
    assert max(new.values()) == 1, "no result counted twice"
    assert {o.status for o in outcomes} <= {RecordStatus.NEW, RecordStatus.DUPLICATE}
    # A DUPLICATE is a redone call of a batch that had failed on another node: counted once, then.
    counts = await state.counts_many(uids)
    assert {(c.total, c.pending, c.failed) for c in counts.values() if c} == {(100, 0, 10)}, "none lost"
    assert {(o.uid, o.item_id) for o in outcomes} == {(uid, item) for uid in uids for item in items}

    async def answers() -> bool:
        return await client.ping()

    await eventually(answers, 10, what="every primary answering PING")
    await asyncio.gather(*(state.delete(uid) for uid in uids))
