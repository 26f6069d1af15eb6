"""The local stack's Postgres with a standby and automatic failover (issue 15's clustered stack):
two real Patroni nodes on a real etcd. The standby streams (synchronously) what the primary
commits; a killed primary's standby is promoted within a bound and the multi-host DSN reaches
it; a pool of `make_pool` that was writing goes on writing through the failover, and a results
batch written across it ends with each item one row, its first outcome. Apart from the pair, two
plain servers behind one multi-host DSN show the pool's checkout check: a primary demoted in
place (read-only, the connection still open) is left for the writable host."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mljob import protocol
from mljob.adapters.jobs_store import JobsStore
from mljob.adapters.results_store import ResultsStore, make_pool, on_writable
from mljob.api.models import Phase
from mljob.core.counts import ItemCounts
from mljob.db.migrate import apply_migrations
from mljob_dev.devstack import postgres_ha
from mljob_dev.devstack.stack import Stack
from support.waiting import eventually, wait_for

#: Seconds from the kill until the standby takes writes: Patroni's TTL plus a round or two.
PROMOTION_BOUND = postgres_ha.TTL + 7


def _stack_dir(prefix: str) -> Path:
    """A directory the postgres user can reach (pytest's own are the owner's only)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


@pytest.fixture(scope="module")
def ha() -> Iterator[Stack]:
    """etcd and the two Patroni nodes, in a stack of their own."""
    stack = Stack(_stack_dir("mljob-pg-ha-"))
    try:
        postgres_ha.start(stack)
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(stack.directory, ignore_errors=True)


def _node_dsn(node: postgres_ha.PostgresNode, database: str = "mljob") -> str:
    return f"postgresql://postgres@127.0.0.1:{node.port}/{database}"


def _result(uid: str, item: str, outcome: protocol.Outcome) -> protocol.Result:
    failed = outcome is protocol.Outcome.FAILED
    return protocol.Result(
        job_uid=uid,
        item_id=item,
        outcome=outcome,
        result=None if failed else {"n": item},
        error="boom" if failed else None,
        attempts=1,
        worker="w",
    )


def test_the_standby_streams_synchronously_what_the_primary_commits(ha: Stack) -> None:
    leader = postgres_ha.primary(ha)
    assert leader is not None
    (standby,) = (n for n in postgres_ha.nodes(ha) if n != leader)
    assert ha.env["MLJOB_POSTGRES_DSN"] == (
        f"postgresql://postgres@127.0.0.1:{postgres_ha.nodes(ha)[0].port},"
        f"127.0.0.1:{postgres_ha.nodes(ha)[1].port}/mljob?target_session_attrs=read-write"
    )
    with psycopg.connect(ha.env["MLJOB_POSTGRES_DSN"], autocommit=True) as conn:
        assert conn.info.port == leader.port
        conn.execute("CREATE TABLE replicated (x int)")
        conn.execute("INSERT INTO replicated VALUES (42)")
        row = conn.execute("SELECT sync_state FROM pg_stat_replication").fetchone()
        assert row == ("sync",)

    def on_standby() -> list[tuple[object, ...]]:  # replayed a moment after the commit returned
        with psycopg.connect(_node_dsn(standby), autocommit=True, connect_timeout=2) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            return conn.execute("SELECT x FROM replicated").fetchall()

    assert wait_for(on_standby, 10, what="the row on the standby") == [(42,)]


async def test_a_killed_primarys_standby_takes_over_and_the_pool_writes_on(ha: Stack) -> None:
    dsn = ha.env["MLJOB_POSTGRES_DSN"]
    schema = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn) as conn:
        apply_migrations(conn, schema=schema)
    pool = make_pool(dsn, schema, max_size=4, timeout=5.0, connect_timeout=2)
    await pool.open(wait=True)
    store, jobs = ResultsStore(pool), JobsStore(pool)
    uid = str(uuid.uuid4())
    items = [f"i{n:03d}" for n in range(300)]
    try:
        await jobs.ensure(uid, "ns", "job", "p", {})
        await jobs.set_phase(uid, Phase.RUNNING, actor="test")
        await store.register_items(uid, items)
        first = {item: protocol.Outcome.SUCCEEDED for item in items[:100]}
        await store.upsert([_result(uid, i, o) for i, o in first.items()])

        # A writer that never stops: each round offers every item, the ones with a first outcome
        # already with the other one (which must not count), and a progress write.
        rounds: list[float] = []
        errors: list[BaseException] = []
        stop = asyncio.Event()

        async def writer() -> None:
            n = 0
            while not stop.is_set():
                chunk = items[(n * 50) % 300 : (n * 50) % 300 + 50]
                batch = [
                    _result(uid, i, protocol.Outcome.FAILED if i in first else protocol.Outcome.SUCCEEDED)
                    for i in chunk
                ]
                try:
                    upserted = await store.upsert(batch)
                    assert all(upserted.stored[(uid, i)] is protocol.Outcome.SUCCEEDED for i in chunk)
                    await jobs.progress(uid, Phase.RUNNING, ItemCounts(300, 0, 0), 300, actor="test")
                except BaseException as err:
                    errors.append(err)
                    return
                rounds.append(time.monotonic())
                n += 1
                await asyncio.sleep(0.02)

        task = asyncio.create_task(writer())
        await eventually(lambda: len(rounds) >= 3, 10, what="the writer's first rounds")
        killed_at = time.monotonic()
        victim = await asyncio.to_thread(postgres_ha.kill_primary, ha)

        async def promoted_node() -> postgres_ha.PostgresNode | None:
            node = await asyncio.to_thread(postgres_ha.primary, ha)
            return node if node is not None and node != victim else None

        promoted = await eventually(promoted_node, PROMOTION_BOUND + 5, what="the standby to be promoted")
        promotion = time.monotonic() - killed_at
        before = len(rounds)
        await eventually(
            lambda: bool(errors) or len(rounds) >= before + 7,  # every item offered once more
            40,
            what="the writer to write again after the promotion",
        )
        stop.set()
        await task
        assert not errors, f"a write failed across the failover: {errors[0]!r}"
        stall = max(b - a for a, b in itertools.pairwise(rounds))
        print(f"promotion {promotion:.1f}s after the kill; the writer's longest stall {stall:.1f}s")
        assert promotion < PROMOTION_BOUND
        assert stall < promotion + 5

        async with pool.connection() as conn:
            assert conn.info.port == promoted.port
            cur = await conn.execute(
                "SELECT item_id, outcome, count(*) OVER (PARTITION BY item_id) FROM mljob_results "
                "WHERE job_uid = %s",
                (uid,),
            )
            rows = await cur.fetchall()
        assert sorted(item for item, _, _ in rows) == items  # every item exactly once
        assert {count for _, _, count in rows} == {1}
        assert all(outcome == "succeeded" for _, outcome, _ in rows)  # the first outcome
        assert await store.count(uid) == (300, 0)
        row = await jobs.get(uid)
        assert row is not None and row.phase is Phase.RUNNING and row.total == 300
        with psycopg.connect(_node_dsn(promoted), autocommit=True) as conn:
            transitions = conn.execute(
                f"SELECT count(*) FROM {schema}.mljob_transitions WHERE job_uid = %s", (uid,)
            ).fetchone()
        assert transitions == (1,)  # progress repeated across the failover moved nothing

        # The killed node comes back as a standby of the new primary (never a second primary).
        await asyncio.to_thread(postgres_ha.start_node, ha, victim.n)
        await eventually(lambda: postgres_ha.streaming(ha) == 1, 60, what="the old primary to stream again")
        assert postgres_ha.primary(ha) == promoted
        with psycopg.connect(_node_dsn(victim), autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    finally:
        await pool.close()


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Stack, Stack]]:
    """Two plain, writable servers (no replication): one multi-host DSN names both."""
    stacks = (Stack(_stack_dir("mljob-pg-a-")), Stack(_stack_dir("mljob-pg-b-")))
    try:
        for stack in stacks:
            stack.start_postgres()
        yield stacks
    finally:
        for stack in stacks:
            stack.stop()
            shutil.rmtree(stack.directory, ignore_errors=True)


@pytest.fixture
async def demotable(pair: tuple[Stack, Stack]) -> AsyncIterator[tuple[str, str, str]]:
    """(DSN of both, DSN of the first, schema), the schema migrated on both servers."""
    first, second = (s.env["MLJOB_POSTGRES_DSN"] for s in pair)
    hosts = ",".join(dsn.split("@")[1].split("/")[0] for dsn in (first, second))
    both = f"postgresql://postgres@{hosts}/mljob?target_session_attrs=read-write"
    schema = f"t_{uuid.uuid4().hex[:10]}"
    for dsn in (first, second):
        with psycopg.connect(dsn) as conn:
            apply_migrations(conn, schema=schema)
    yield both, first, schema
    with psycopg.connect(first, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")


async def test_a_primary_demoted_in_place_is_left_for_the_writable_host(
    demotable: tuple[str, str, str],
) -> None:
    """The connection to the demoted server stays open and answers `SELECT 1`: only the
    checkout check (`writable`) sees that it takes no writes; a raw checkout must not hand it out."""
    both, first, schema = demotable
    pool = make_pool(both, schema, min_size=2, max_size=2, timeout=5.0, connect_timeout=2)
    await pool.open(wait=True)
    try:
        store = ResultsStore(pool)
        uid = str(uuid.uuid4())
        async with pool.connection() as conn:
            first_port = conn.info.port
        assert _demote(first) == first_port
        await asyncio.sleep(0.2)  # the reload reaches every backend
        for _ in range(3):
            async with pool.connection() as conn:
                assert conn.info.port != first_port
                await conn.execute("INSERT INTO mljob_items (job_uid, item_id) VALUES (%s, 'x')", (uid,))
                await conn.execute("DELETE FROM mljob_items WHERE job_uid = %s", (uid,))
        await store.register_items(uid, ["a", "b"])
        stored = await store.upsert([_result(uid, "a", protocol.Outcome.SUCCEEDED)])
        assert stored.stored == {(uid, "a"): protocol.Outcome.SUCCEEDED}
    finally:
        await pool.close()


async def test_a_write_refused_as_read_only_is_written_again_on_the_writable_host(
    demotable: tuple[str, str, str],
) -> None:
    """Demoted between the checkout and the statement: the server refuses it (25006); the
    connection is dropped and the write done on the primary, even a write that is not idempotent
    (a refused statement wrote nothing)."""
    both, first, schema = demotable
    pool = make_pool(both, schema, min_size=1, max_size=2, timeout=5.0, connect_timeout=2)
    await pool.open(wait=True)
    ports: list[int] = []
    uid = str(uuid.uuid4())

    async def insert(conn: psycopg.AsyncConnection[Any]) -> None:
        ports.append(conn.info.port)
        if len(ports) == 1:
            await asyncio.to_thread(_demote, first)
            await asyncio.sleep(0.2)
        await conn.execute("INSERT INTO mljob_dead_letters (source, reason) VALUES (%s, 'r')", (uid,))

    try:
        await on_writable(pool, insert, idempotent=False)
    finally:
        await pool.close()
    assert len(ports) == 2 and ports[0] != ports[1]
    with psycopg.connect(first, autocommit=True) as conn:
        assert conn.info.port == ports[0]
        found = conn.execute(f"SELECT count(*) FROM {schema}.mljob_dead_letters WHERE source = %s", (uid,))
        assert found.fetchone() == (0,)


def _demote(dsn: str) -> int:
    """Make the server of `dsn` read-only in place (its sessions stay open); returns its port."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        admin.execute("SELECT pg_reload_conf()")
        return admin.info.port
