"""Metric names, labels and recorders; readiness; log formats; the single-replica leadership. No services."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mljob import protocol
from mljob.adapters.redis_state import RecordOutcome, RecordStatus
from mljob.api.models import Phase
from mljob.controller.main import make_leadership
from mljob.core.counts import ItemCounts
from mljob.ops import logs, metrics
from mljob.ops.health import HealthServer, Readiness
from mljob.settings import OperatorSettings

pytestmark = pytest.mark.unit
CHART = Path(__file__).resolve().parents[2] / "charts" / "mljob-operator"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def mljob_families() -> dict[str, str]:
    return {m.name: m.type for m in REGISTRY.collect() if m.name.startswith("mljob_")}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("MaxDeliveriesExceeded: item 7 was delivered 5 times", "MaxDeliveriesExceeded"),
        ("Lost: the job stalled", "Lost"),
        ("DeadlineExceeded: activeDeadlineSeconds passed", "DeadlineExceeded"),
        ("StreamLost: recreated 3 times", "StreamLost"),
        ("ResultRejected: NUL byte", "ResultRejected"),
        ("item 7 is unreadable", "HandlerFailed"),
        ("ValueError: boom", "HandlerFailed"),  # a worker's text never becomes a label value
        ("Lostly: not ours", "HandlerFailed"),
        ("", "HandlerFailed"),
        (None, "HandlerFailed"),
    ],
)
def test_failure_reason_is_the_decided_prefix_else_handler_failed(error: str | None, reason: str) -> None:
    assert metrics.failure_reason(error) == reason


def test_label_values_are_snake_case() -> None:
    assert metrics.label_value("rejected by Postgres, item failed") == "rejected_by_postgres_item_failed"
    assert metrics.label_value("too large") == "too_large"
    assert metrics.label_value("!!") == "unknown"


def test_names_follow_prometheus_conventions() -> None:
    families = mljob_families()
    for name, kind in families.items():
        assert re.fullmatch(r"mljob_[a-z_]+", name), name
        if kind == "counter":
            assert not name.endswith("_total"), name  # the client adds _total to the samples
        if kind == "histogram":
            assert name.endswith(("_seconds", "_size")), name
    assert families["mljob_reconcile_duration_seconds"] == "histogram"
    assert families["mljob_collector_batch_size"] == "histogram"
    assert families["mljob_collector_lag_seconds"] == "gauge"
    assert families["mljob_jobs"] == families["mljob_backlog"] == "gauge"
    for counter in ("items_processed", "items_failed", "items_lost", "tasks_dispatched", "guard_refusals"):
        assert families[f"mljob_{counter}"] == "counter"


def test_every_metric_the_chart_queries_exists() -> None:
    """The PrometheusRule and KEDA's query name only series this code exports."""
    exported = set()
    for name, kind in mljob_families().items():
        exported |= {f"{name}_total"} if kind == "counter" else {name, f"{name}_count", f"{name}_sum"}
    text = "\n".join(p.read_text() for p in (CHART / "templates").glob("*.yaml"))
    used = set(re.findall(r"\b(mljob_[a-z_]+)\{", text))
    assert used, "the chart should query mljob_ metrics"
    assert used <= exported, used - exported


def result(item: str, error: str | None = None) -> protocol.Result:
    outcome = protocol.Outcome.FAILED if error is not None else protocol.Outcome.SUCCEEDED
    return protocol.Result(job_uid="u", item_id=item, outcome=outcome, error=error)


def test_count_recorded_counts_new_outcomes_once_with_their_reason() -> None:
    processed = sample("mljob_items_processed_total")
    handler = sample("mljob_items_failed_total", reason="HandlerFailed")
    rejected = sample("mljob_items_failed_total", reason="ResultRejected")
    results = [result("a"), result("b", "boom"), result("c", "ResultRejected: NUL"), result("d", "x")]
    outcomes = [
        RecordOutcome("u", "a", RecordStatus.NEW, 3),
        RecordOutcome("u", "b", RecordStatus.NEW, 2),
        RecordOutcome("u", "c", RecordStatus.NEW, 1),
        RecordOutcome("u", "d", RecordStatus.DUPLICATE, 1),  # a replay: counted the first time
    ]
    metrics.count_recorded(results, outcomes)
    assert sample("mljob_items_processed_total") - processed == 3
    assert sample("mljob_items_failed_total", reason="HandlerFailed") - handler == 1
    assert sample("mljob_items_failed_total", reason="ResultRejected") - rejected == 1


def test_items_failed_by_the_operator_are_processed_failed_and_lost() -> None:
    before = (
        sample("mljob_items_processed_total"),
        sample("mljob_items_failed_total", reason="Lost"),
        sample("mljob_items_lost_total", cause="Lost"),
    )
    metrics.items_failed_by_operator("Lost", 4)
    metrics.items_failed_by_operator("Lost", 0)
    after = (
        sample("mljob_items_processed_total"),
        sample("mljob_items_failed_total", reason="Lost"),
        sample("mljob_items_lost_total", cause="Lost"),
    )
    assert [b - a for a, b in zip(before, after, strict=True)] == [4, 4, 4]


def test_collector_lag_is_the_oldest_result_age_never_negative() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    old = result("a").model_copy(update={"finished_at": now - timedelta(seconds=30)})
    new = result("b").model_copy(update={"finished_at": now - timedelta(seconds=2)})
    metrics.collector_lag([new, old], now=now.timestamp())
    assert sample("mljob_collector_lag_seconds") == 30
    metrics.collector_lag([result("c").model_copy(update={"finished_at": now})], now=now.timestamp() - 5)
    assert sample("mljob_collector_lag_seconds") == 0


def test_job_table_exports_every_phase_and_the_backlog_per_pipeline() -> None:
    table = metrics.JobTable()
    table.track("1", Phase.RUNNING, "p", ItemCounts(total=10, pending=4, failed=0))
    table.track("2", Phase.DISPATCHING, "p", ItemCounts(total=5, pending=5, failed=0))
    table.track("3", Phase.CANCELING, "q", ItemCounts(total=5, pending=5, failed=0))  # not queued work
    table.track("4", None, "q", None)

    def values() -> dict[tuple[str, str], float]:
        return {(s.name, next(iter(s.labels.values()))): s.value for f in table.collect() for s in f.samples}

    got = values()
    assert got[("mljob_jobs", "Running")] == got[("mljob_jobs", "Dispatching")] == 1
    assert got[("mljob_jobs", "Pending")] == got[("mljob_jobs", "Canceling")] == 1
    assert got[("mljob_jobs", "Succeeded")] == 0  # every phase is there, 0 included
    assert got[("mljob_backlog", "p")] == 9
    assert got[("mljob_backlog", "q")] == 0
    table.track("1", Phase.SUCCEEDED, "p", None)
    table.track("2", Phase.FAILED, "p", None)
    got = values()
    assert got[("mljob_backlog", "p")] == 0
    assert got[("mljob_jobs", "Succeeded")] == got[("mljob_jobs", "Failed")] == 1
    for uid in "1234":
        table.forget(uid)
    assert all(v == 0 for (name, _), v in values().items() if name == "mljob_jobs")
    assert not [k for k in values() if k[0] == "mljob_backlog"]


async def test_readiness_names_what_failed_and_caches_its_verdict() -> None:
    calls = {"Redis": 0}
    now = [0.0]

    async def ok() -> None:
        return None

    async def redis() -> None:
        calls["Redis"] += 1
        raise ConnectionError("Connection refused")

    async def hangs() -> None:
        await asyncio.sleep(10)

    readiness = Readiness(timeout=0.05, cache_seconds=2.0, clock=lambda: now[0])
    assert await readiness.problem() == "not connected yet to NATS, Redis and Postgres"
    readiness.connected({"NATS": ok, "Redis": redis, "Postgres": hangs})
    problem = await readiness.problem()
    assert problem == "Redis: ConnectionError: Connection refused; Postgres: timed out"
    now[0] = 1.0
    assert await readiness.problem() == problem
    assert calls["Redis"] == 1, "a verdict younger than cache_seconds is reused"
    readiness.connected({"NATS": ok, "Redis": ok})
    assert await readiness.problem() is None


def record(msg: str = "reconcile of a job failed", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("mljob.controller.loop", logging.WARNING, __file__, 1, msg, (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    logs.JobFilter().filter(rec)
    return rec


def test_json_lines_carry_the_job_of_the_task() -> None:
    with logs.job_context("team-a", "embed", "uid-1"):
        line = logs.JsonFormatter().format(record())
    body = json.loads(line)
    assert (body["namespace"], body["job"], body["uid"]) == ("team-a", "team-a/embed", "uid-1")
    assert body["level"] == "WARNING" and body["message"] == "reconcile of a job failed"
    assert "uid" not in json.loads(logs.JsonFormatter().format(record()))  # outside: no job
    kopf_line = json.loads(
        logs.JsonFormatter().format(record(k8s_ref={"namespace": "n", "name": "j", "uid": "u2"}))
    )
    assert (kopf_line["job"], kopf_line["uid"]) == ("n/j", "u2")
    only_uid = json.loads(logs.JsonFormatter().format(record(**logs.job_extra("u3"))))
    assert only_uid["uid"] == "u3"


def test_text_lines_stay_readable_and_name_the_job_once() -> None:
    with logs.job_context("team-a", "embed", "uid-1"):
        plain = logs.TextFormatter().format(record("job team-a/embed: stalled"))
        named = logs.TextFormatter().format(record("job uid-1: item 7 failed"))
    assert plain.endswith("mljob.controller.loop: job team-a/embed: stalled [job team-a/embed uid-1]")
    assert named.endswith("mljob.controller.loop: job uid-1: item 7 failed")


def test_without_leader_election_one_replica_leads_from_the_start_without_the_api() -> None:
    metrics.LEADER.set(0)
    leadership = make_leadership(OperatorSettings(leader_election=False))
    assert leadership.leading.is_set() and not leadership.lost.is_set()
    assert not leadership.elected
    assert sample("mljob_leader") == 1


async def test_the_server_answers_and_a_taken_port_does_not_stop_the_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    first = HealthServer(port, Readiness(), host="127.0.0.1")
    second = HealthServer(port, Readiness(), host="127.0.0.1")
    await first.start()
    try:
        with caplog.at_level(logging.ERROR, logger="mljob.ops.health"):
            await second.start()  # logs and carries on
        assert f"cannot serve /metrics and /readyz on port {port}" in caplog.text
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as reply:
                assert (reply.status, await reply.text()) == (
                    503,
                    "not ready: not connected yet to NATS, Redis and Postgres\n",
                )
            async with http.get(f"http://127.0.0.1:{port}/metrics") as reply:
                assert reply.status == 200
                assert "mljob_items_processed_total" in await reply.text()
    finally:
        await second.stop()
        await first.stop()
