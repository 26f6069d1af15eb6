"""Results are checked before they count (issue 6, section 6), against REAL NATS, Redis, Postgres.

A refused result is dead-lettered with its reason and acked, stores no result row, and never
keeps the item's genuine result (published after it) from counting. Fixtures and helpers are
the collector tests' own: a private results stream per test, Redis by prefix, Postgres by schema.
"""

from __future__ import annotations

import logging
import re
import uuid

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from redis.asyncio import Redis

from mljob import protocol
from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore
from support.collecting import (
    FAILED,
    OK,
    PIPELINE,
    ResultsStream,
    body,
    collector_for,
    dead_letters,
    dispatched,
    running,
    settled,
    stream_messages,
)
from support.waiting import eventually


async def result_keys(store: ResultsStore) -> set[tuple[str, str, str]]:
    """Every result row of the schema: (job uid, item id, outcome)."""
    async with store.pool.connection() as conn:
        cur = await conn.execute("SELECT job_uid, item_id, outcome FROM mljob_results")
        return {(r[0], r[1], r[2]) for r in await cur.fetchall()}


async def all_acked(js: JetStreamContext, rs: ResultsStream) -> None:
    await eventually(lambda: settled(js, rs), 60, what="every message acked")
    info = await js.consumer_info(rs.stream, rs.consumer)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    assert await stream_messages(js, rs) == 0


def refused_body(case: str, uid: str, stranger: str, results: ResultsStream) -> tuple[bytes, str, str]:
    """A message the collector must refuse, aimed at item `a` where it can be; the subject it is
    published on; and the reason's start. Each is a failed outcome that would win over `a`'s
    genuine success if stored."""
    subject = results.subject(uid)
    if case == "version":
        return body(uid, "a", FAILED, version=99), subject, "unsupported protocol version 99"
    if case == "too-large":
        return body(uid, "a", FAILED, error="x" * 600_000), subject, "result too large: 6"
    if case == "unknown-job":
        reason = f"unknown job: no items are registered for job {stranger}"
        return body(stranger, "a", FAILED), results.subject(stranger), reason
    if case == "wrong-subject":  # the body names the job, the subject another one
        reason = f"wrong subject: a result of job {uid} belongs on {results.prefix}.<pipeline>.{uid}"
        return body(uid, "a", FAILED), results.subject(stranger), reason
    if case == "wrong-pipeline":  # a worker of pipeline `other` answering for this job
        reason = f"wrong pipeline: job {uid} belongs to pipeline {PIPELINE!r}"
        return body(uid, "a", FAILED), results.subject(uid, pipeline="other"), reason
    assert case == "not-an-item"
    return body(uid, "a ", FAILED), subject, f"not an item: 'a ' is not an item of job {uid}"


async def job_row(store: ResultsStore, uid: str, pipeline: str) -> None:
    """The job's row in the ledger, as dispatch writes it before registering the items."""
    async with store.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO mljob_jobs (uid, namespace, name, pipeline, phase) "
            "VALUES (%s, 'ns', %s, %s, 'Running')",
            (uid, f"job-{uid[:8]}", pipeline),
        )


CASES = ["version", "too-large", "unknown-job", "not-an-item", "wrong-subject", "wrong-pipeline"]


@pytest.mark.parametrize("case", CASES)
async def test_refused_result_is_dead_lettered_acked_and_never_counts(
    case: str,
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    results: ResultsStream,
    redis: Redis,
    prefix: str,
) -> None:
    uid, stranger = str(uuid.uuid4()), str(uuid.uuid4())
    await job_row(store, uid, PIPELINE)
    assert await dispatched(state, store, uid, ["a", "b"])
    bad, subject, reason = refused_body(case, uid, stranger, results)
    await js.publish(subject, bad)  # first, so that it would win if it were stored
    await js.publish(results.subject(uid), body(uid, "a", OK, result={"genuine": True}))
    await js.publish(results.subject(uid), body(uid, "b", OK))

    async with running(collector_for(js, nc, state, store, results)):
        await all_acked(js, results)

    letters = await dead_letters(store)
    assert len(letters) == 1, letters
    source, letter_subject, payload, letter_reason = letters[0]
    assert (source, letter_subject, payload) == ("collector", subject, bad)
    assert letter_reason.startswith(reason), letter_reason
    assert await result_keys(store) == {(uid, "a", "succeeded"), (uid, "b", "succeeded")}
    counts = await state.counts(uid)
    assert counts is not None and (counts.total, counts.pending, counts.failed) == (2, 0, 0)
    assert await store.registered_count(stranger) == 0
    assert [k async for k in redis.scan_iter(match=f"{prefix}:*{stranger}*")] == []


async def test_forged_failures_never_replace_the_genuine_outcome(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    results: ResultsStream,
) -> None:
    uid = str(uuid.uuid4())
    items = ["img-1", "img-2"]
    assert await dispatched(state, store, uid, items)
    # img-2's genuine success reached Postgres, then the collector died before Redis and the ack.
    await store.upsert([protocol.Result(job_uid=uid, item_id="img-2", outcome=OK)])
    subject = results.subject(uid)
    # A forged failure for a look-alike id comes first, forged failures of the real items next
    # (img-2's lands before the redelivery of its genuine result), the genuine results last.
    await js.publish(subject, body(uid, "img-1\u200b", FAILED, error="forged"))
    await js.publish(subject, body(uid, "img-2", FAILED, error="forged"))
    for item in items:
        await js.publish(subject, body(uid, item, OK, result={"genuine": item}))
    await js.publish(subject, body(uid, "img-1", FAILED, error="forged later"))

    async with running(collector_for(js, nc, state, store, results, batch=2)):
        await all_acked(js, results)

    assert await store.item_outcomes(uid) == {"img-1": "succeeded", "img-2": "succeeded"}
    counts = await state.counts(uid)
    assert counts is not None and (counts.pending, counts.failed, counts.succeeded) == (0, 0, 2)
    assert await state.failed_ids(uid) == set()  # Redis was told what the ledger kept
    letters = await dead_letters(store)
    assert [reason.split(":")[0] for *_, reason in letters] == ["not an item"]


async def test_a_flood_of_refusals_is_logged_as_summaries_not_per_message(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    results: ResultsStream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uid = str(uuid.uuid4())
    assert await dispatched(state, store, uid, ["real"])
    subject = results.subject(uid)
    for n in range(300):
        await js.publish(subject, body(uid, f"forged-{n}", FAILED))
    await js.publish(subject, body(uid, "real", OK))

    caplog.set_level(logging.WARNING, logger="mljob.collector.results")
    async with running(collector_for(js, nc, state, store, results, batch=64)):
        await all_acked(js, results)

    lines = [r.getMessage() for r in caplog.records if r.name == "mljob.collector.results"]
    summaries = [line for line in lines if line.startswith("refused ")]
    assert summaries and len(lines) <= 3, lines
    counted = sum(int(m.group(1)) for line in summaries if (m := re.match(r"refused (\d+) ", line)))
    assert counted == 300
    assert all("not an item" in line for line in summaries)
    assert len(await dead_letters(store)) == 300
    assert await result_keys(store) == {(uid, "real", "succeeded")}
    counts = await state.counts(uid)
    assert counts is not None and counts.pending == 0


async def test_result_without_a_version_is_malformed(
    js: JetStreamContext,
    nc: NATS,
    state: JobState,
    store: ResultsStore,
    results: ResultsStream,
) -> None:
    """`version` is required on the wire: a result without one is not taken for version 1."""
    uid = str(uuid.uuid4())
    assert await dispatched(state, store, uid, ["a"])
    unversioned = b'{"job_uid": "%s", "item_id": "a", "outcome": "failed"}' % uid.encode()
    await js.publish(results.subject(uid), unversioned)
    async with running(collector_for(js, nc, state, store, results)):
        await all_acked(js, results)
    letters = await dead_letters(store)
    assert [(payload, reason) for _, _, payload, reason in letters] == [
        (unversioned, "invalid result: Field required at ('version',)")
    ]
    assert await store.unresolved_items(uid) == ["a"]
