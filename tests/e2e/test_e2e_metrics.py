"""Observability end to end: /metrics counters against a real job, /readyz following Redis, kopf's
/healthz, the collector's own metrics, and JSON log lines that name their job."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from support.env import E2E
from support.harness import Proc
from support.waiting import wait_for

ITEMS = [f"m-{i:04d}" for i in range(200)]  # tenth_fail fails the ids ending in 7: 20 of them
FAILED = sum(1 for i in range(200) if i % 10 == 7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""  # not listening (yet)


class Scrape:
    """One scrape of /metrics; `value` sums the samples whose labels include the given ones."""

    def __init__(self, port: int) -> None:
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200, text
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"metrics": free_port(), "health": free_port(), "collector": free_port()}


@pytest.fixture(scope="module")
def operator(e2e: E2E, ports: dict[str, int]) -> Iterator[Proc]:
    """The module's operator again, with metrics, kopf's liveness endpoint and JSON logs."""
    assert e2e.operator is not None
    e2e.operator.stop()
    proc = e2e.start_operator(
        f"--liveness=http://127.0.0.1:{ports['health']}/healthz",
        MLJOB_METRICS_PORT=str(ports["metrics"]),
        MLJOB_LOG_FORMAT="json",
    )
    wait_for(lambda: get(f"http://127.0.0.1:{ports['metrics']}/readyz")[0] == 200, 90, what="readyz 200")
    yield proc


def test_counters_follow_the_job(e2e: E2E, operator: Proc, ports: dict[str, int]) -> None:
    port = ports["metrics"]
    uid = e2e.apply("metrics-job", "metrics", ITEMS)

    def queued() -> Scrape | None:  # no worker yet: the whole job is backlog
        scrape = Scrape(port)
        return scrape if scrape.value("mljob_backlog", pipeline="metrics") == len(ITEMS) else None

    during = wait_for(queued, 60, what="the backlog of the dispatched job")
    assert during.value("mljob_jobs", phase="Running") == 1
    assert during.value("mljob_tasks_dispatched_total") == len(ITEMS)
    assert during.value("mljob_items_processed_total") == 0

    e2e.start_worker("metrics", "tenth_fail", "--concurrency", "16")
    status = e2e.wait_terminal("metrics-job", timeout=120)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", len(ITEMS), FAILED)

    def settled() -> Scrape | None:
        scrape = Scrape(port)
        done = scrape.value("mljob_jobs", phase="Succeeded") == 1
        return scrape if done and scrape.value("mljob_backlog", pipeline="metrics") == 0 else None

    after = wait_for(settled, 30, what="mljob_jobs{phase=Succeeded} == 1 and the backlog at 0")
    assert after.value("mljob_items_processed_total") == len(ITEMS)
    assert after.value("mljob_items_failed_total", reason="HandlerFailed") == FAILED
    assert after.value("mljob_items_failed_total") == FAILED  # no other reason
    assert after.value("mljob_items_lost_total") == 0
    assert after.value("mljob_jobs", phase="Running") == 0
    assert after.value("mljob_tasks_dispatched_total") == len(ITEMS)
    assert after.value("mljob_reconcile_duration_seconds_count") > 0
    assert after.value("mljob_reconcile_duration_seconds_count", action="finish") >= 1
    assert after.value("mljob_cleanups_total") >= 1
    assert after.value("mljob_collector_batch_size_count") > 0  # the in-process collector
    assert after.value("mljob_reconcile_errors_total") == 0
    assert e2e.result_rows(uid)


def test_readyz_follows_redis_and_kopf_liveness_answers(
    e2e: E2E, operator: Proc, ports: dict[str, int]
) -> None:
    readyz = f"http://127.0.0.1:{ports['metrics']}/readyz"
    assert get(readyz) == (200, "ok\n")
    status, body = get(f"http://127.0.0.1:{ports['health']}/healthz")
    assert status == 200, body

    client = redis.Redis.from_url(e2e.stack.redis_url)
    try:
        client.execute_command("CLIENT", "PAUSE", "8000", "ALL")
    finally:
        client.close()
    refused = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get(readyz)), 8, what="readyz 503")
    assert refused[1].startswith("not ready: Redis: ") and refused[1].count("\n") == 1, refused
    wait_for(lambda: get(readyz)[0] == 200, 30, what="readyz 200 once Redis answers again")


def test_json_log_lines_name_their_job(e2e: E2E, operator: Proc) -> None:
    uid = e2e.apply("metrics-dupes", "nobody", ["a", "b", "a"])  # fails InvalidItems, logs about it
    e2e.wait_terminal("metrics-dupes", timeout=30)

    def lines() -> list[dict[str, str]]:
        text = operator.log_path.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON

    about = wait_for(
        lambda: [line for line in lines() if line.get("uid") == uid], 15, what="a log line about the job"
    )
    assert all(line["job"] == f"{e2e.namespace}/metrics-dupes" for line in about), about
    assert any("InvalidItems" in line["message"] or "duplicate" in line["message"] for line in about)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines())


def test_the_collector_process_serves_its_own_metrics(
    e2e: E2E, operator: Proc, ports: dict[str, int]
) -> None:
    operator.stop()
    e2e.start_operator("--no-collector", MLJOB_METRICS_PORT=str(ports["metrics"]))
    port = ports["collector"]
    e2e.start_collector(MLJOB_METRICS_PORT=str(port))
    wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 60, what="the collector's readyz")
    items = [f"c-{i:03d}" for i in range(50)]
    e2e.apply("metrics-collected", "collected", items)
    e2e.start_worker("collected", "tenth_fail")
    assert e2e.wait_terminal("metrics-collected", timeout=120)["phase"] == "Succeeded"
    scrape = Scrape(port)
    assert scrape.value("mljob_items_processed_total") == len(items)
    assert scrape.value("mljob_items_failed_total", reason="HandlerFailed") == 5
    assert scrape.value("mljob_collector_batch_size_count") > 0
    assert scrape.value("mljob_collector_batch_size_sum") >= len(items)
    operator_side = wait_for(
        lambda: (lambda s: s if s.value("mljob_jobs", phase="Succeeded") >= 1 else None)(
            Scrape(ports["metrics"])
        ),
        30,
        what="the operator's metrics",
    )
    assert operator_side.value("mljob_items_processed_total") == 0  # collected elsewhere
