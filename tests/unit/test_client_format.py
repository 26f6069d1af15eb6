"""mljob.client's pure parts, table-driven (2 of 2): tables, the status screen, what the runbook
says about each disagreement the API can report, progress bars and their painter, the output
writers, the read-only API's refusals as one-line errors, and the kubeconfig as kubectl reads it."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mljob.client import output, runbook, statusview, tables
from mljob.client.errors import ClientError, Forbidden, NotFound, Unauthorized, Unavailable, UsageError
from mljob.client.kubeconfig import connect
from mljob.client.progress import JobView, Painter, Tracker, bar
from mljob.client.rate import Rate
from mljob.client.reads import Page
from mljob.client.transport import ApiTransport, ServiceRef, Target
from mljob.httpapi.disagree import KubeView, LedgerView, NatsView, RedisView, disagreements

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        ("", "-"),
        (12345, "12,345"),
        (True, "true"),
        (0.5, "0.50"),
        ("two\nlines  here", "two lines here"),
    ],
)
def test_cells(value: Any, text: str) -> None:
    assert tables.cell(value) == text


def test_a_table_pads_columns_and_cuts_long_cells() -> None:
    lines = tables.table(
        ["id", "outcome", "error"], [["a", "failed", "x" * 20], ["bb", None, "short"]], {"error": 8}
    )
    assert lines == ["ID  OUTCOME  ERROR", "a   failed   xxxxxxx…", "bb  -        short"]


def test_a_paged_table_prints_one_header_and_widths_that_only_grow() -> None:
    paged = tables.PagedTable(["id", "n"])
    first = paged.page([{"id": "a", "n": 1}])
    second = paged.page([{"id": "longer-id", "n": 22}, {"id": "b", "n": 3}])
    assert first == ["ID  N", "a   1"]
    assert second == ["longer-id  22", "b          3"]
    assert paged.page([{"id": "c", "n": 4}]) == ["c          4"]


# ------------------------------------------------------------------------------------ runbook

HEADINGS = {
    line[4:].strip()
    for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
    if line.startswith("### ")
} | {
    line[3:].strip()
    for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
    if line.startswith("## ")
}


def test_every_entry_cited_is_a_heading_of_the_runbook() -> None:
    for entry in runbook.ENTRIES:
        assert entry.heading in HEADINGS, entry.heading


LEDGER = LedgerView(phase="Running", registered=10, succeeded=4, failed=1)
CASES = [
    (KubeView("Running"), LedgerView(None, 0, 0, 0), None, None, runbook.ROW_7),
    (KubeView("Succeeded", 10, 10, 1), LedgerView("Failed", 10, 9, 1), None, None, runbook.ROW_7),
    (KubeView("Running", 10, 5, 1), LedgerView("Succeeded", 10, 9, 1), None, None, runbook.ROW_7),
    (KubeView("Succeeded", 10, 10, 1), LedgerView("Running", 10, 9, 1), None, None, runbook.ROW_7),
    (KubeView("Succeeded", 10, 8, 1), LedgerView("Succeeded", 10, 10, 1), None, None, runbook.ROW_10),
    (KubeView("Succeeded", 10, 10, 2), LedgerView("Succeeded", 10, 9, 1), None, None, runbook.ROW_7),
    (KubeView("Running", 12, 5, 1), LEDGER, RedisView(True, 10, 5, 1), None, runbook.ROW_8),
    (KubeView("Succeeded"), None, RedisView(True, 10, 0, 1), None, runbook.ROW_13),
    (KubeView("Running"), LEDGER, RedisView(False), None, runbook.ROW_12),
    (KubeView("Running"), LEDGER, RedisView(True, 11, 5, 1), None, runbook.ROW_8),
    (KubeView("Running"), LEDGER, RedisView(True, 10, 7, 1), None, runbook.STORE_DOWN),
    (KubeView("Running"), LEDGER, RedisView(True, 10, 2, 1), None, runbook.ROW_8),
    (KubeView("Succeeded"), None, None, NatsView(consumer=True), runbook.ROW_13),
    (KubeView("Running"), LEDGER, None, NatsView(consumer=False), runbook.ROW_11),
]


@pytest.mark.parametrize(("kube", "ledger", "redis", "nats", "entry"), CASES)
def test_each_disagreement_the_api_words_has_its_runbook_entry(
    kube: KubeView,
    ledger: LedgerView | None,
    redis: RedisView | None,
    nats: NatsView | None,
    entry: runbook.Entry,
) -> None:
    sentences = disagreements(kube, ledger, redis, nats)
    assert sentences, "the case must produce a disagreement"
    assert runbook.entry_for(sentences[0]) == entry, sentences[0]
    assert all(runbook.entry_for(s) != runbook.WHERE for s in sentences), sentences


# ------------------------------------------------------------------------------------ status screen


def summary(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "namespace": "team-a",
        "name": "thumbs",
        "uid": "u-1",
        "pipeline": "thumbnails",
        "phase": "Running",
        "created": "1970-01-01T00:00:00Z",
        "status": {
            "phase": "Running",
            "total": 1000,
            "processed": 600,
            "failed": 12,
            "startTime": "1970-01-01T00:00:40Z",
            "conditions": [
                {
                    "type": "Progressing",
                    "status": "True",
                    "reason": "Running",
                    "message": "m" * 100,
                    "lastTransitionTime": "1970-01-01T00:00:40Z",
                }
            ],
        },
        "postgres": {
            "job": {"phase": "Running", "lastActivityTime": "1970-01-01T00:01:35Z"},
            "items": 1000,
            "outcomes": {"succeeded": 590, "failed": 12, "pending": 398},
            "failedByReason": {"HandlerFailed": 10, "MaxDeliveriesExceeded": 2},
        },
        "redis": {
            "present": True,
            "total": 1000,
            "pending": 399,
            "processed": 601,
            "failed": 12,
            "lastActivity": None,
        },
        "nats": {"present": True, "numPending": 300, "numAckPending": 90, "numRedelivered": 4},
        "errors": {},
        "disagreements": [],
    }
    base.update(over)
    return base


def test_the_status_screen_puts_the_stores_side_by_side() -> None:
    lines = statusview.render(summary(), Rate(12.5, 60.0), 32.0, now=100.0)
    text = "\n".join(lines)
    assert "Progress:    60%  600 of 1,000 processed (12 failed), 400 pending" in lines
    assert "Rate:        12/s over the last 60s" in lines and "ETA:         32s" in lines
    stores = lines[lines.index("Stores:") + 1 :]
    assert stores[0].split() == ["MLJob", "Postgres", "Redis", "NATS", "consumer"]
    rows = {
        row.split()[0] + (" " + row.split()[1] if row.split()[1] == "pending" else ""): row.split()
        for row in stores[1:9]
    }
    assert rows["processed"][1:] == ["600", "602", "601", "-"]
    assert rows["pending"][1:] == ["400", "398", "399", "300"]
    assert rows["ack pending"][2:] == ["-", "-", "-", "90"] and rows["redelivered"][1:] == [
        "-",
        "-",
        "-",
        "4",
    ]
    assert "Failed by reason (Postgres): HandlerFailed 10, MaxDeliveriesExceeded 2" in lines
    assert "Disagreements: none" in lines
    assert "m" * 100 not in text and "m" * 60 in text  # a long message is cut, in full with -o wide
    assert "m" * 100 in "\n".join(statusview.render(summary(), None, None, now=100.0, wide=True))


def test_the_status_screen_says_what_the_runbook_says() -> None:
    sentence = (
        "Redis has no state for this running job: the operator rebuilds it from Postgres on its next look "
        "at the job"
    )
    lines = statusview.render(
        summary(redis=None, errors={"redis": "Redis: connection refused"}, disagreements=[sentence]),
        None,
        None,
        100.0,
    )
    assert f"  - {sentence}" in lines
    heading = "Row 12 — Redis lost the job's state (FLUSHALL, failover without persistence, eviction)"
    assert f'    runbook: docs/operations.md, "{heading}"' in lines
    assert any(line.startswith("    it says: the operator rebuilds the state") for line in lines)
    assert "  redis: Redis: connection refused" in lines and "Rate:        - (no samples yet)" in lines
    data = statusview.as_data(summary(disagreements=[sentence]), Rate(1.23456, 30.0), 10.04)
    assert (
        data["rate"] == {"perSecond": 1.235, "overSeconds": 30.0, "sinceStart": False}
        and data["etaSeconds"] == 10.0
    )
    assert data["runbook"][0]["section"].startswith("Row 12 — ")


def test_a_finished_job_shows_how_long_it_ran() -> None:
    status = {
        "phase": "Succeeded",
        "total": 4,
        "processed": 4,
        "failed": 0,
        "startTime": "1970-01-01T00:00:10Z",
        "completionTime": "1970-01-01T00:01:15Z",
    }
    lines = statusview.render(
        summary(status=status, redis={"present": False}, nats={"present": False}), None, None, 100.0
    )
    assert "Finished:    25s ago (ran 1m05s)" in lines and not any(line.startswith("ETA") for line in lines)
    assert any(line.split()[:5] == ["phase", "Succeeded", "Running", "no", "state"] for line in lines)


# ------------------------------------------------------------------------------------ progress


@pytest.mark.parametrize(
    ("job", "current", "line"),
    [
        (JobView("ns", "a", "Pending", 0, 0, 0), None, "a [░░░░░░░░]   0%  0/0  failed 0  Pending"),
        (
            JobView("ns", "a", "Running", 1000, 420, 3),
            Rate(20.0, 60),
            "a [███░░░░░]  42%  420/1,000  failed 3  Running  20/s  ETA 29s",
        ),
        (JobView("ns", "a", "Running", 10, 9, 0), None, "a [███████░]  90%  9/10  failed 0  Running"),
        (
            JobView("ns", "a", "Succeeded", 10, 10, 1),
            Rate(5.0, 60),
            "a [████████] 100%  10/10  failed 1  Succeeded",
        ),
        (
            JobView("ns", "a", "Running", 10, 3, 0, deleted=True),
            None,
            "a [██░░░░░░]  30%  3/10  failed 0  Deleted",
        ),
    ],
)
def test_bars(job: JobView, current: Rate | None, line: str) -> None:
    assert bar(job, current, width=8) == line


def test_the_tracker_aligns_names_and_knows_each_rate() -> None:
    tracker = Tracker()
    tracker.update(JobView("ns", "long-name", "Running", 100, 0, 0), 0.0)
    tracker.update(JobView("ns", "b", "Running", 100, 10, 0), 0.0)
    tracker.update(JobView("ns", "b", "Running", 100, 40, 0), 10.0)
    frame = tracker.frame(10.0, width=4)
    assert frame[0].startswith("b         [█░░░]  40%") and "3.0/s  ETA 20s" in frame[0]
    assert frame[1].startswith("long-name [░░░░]") and frame[1].endswith("0/s  ETA -")  # not moving


def test_the_painter_redraws_in_place_on_a_terminal_and_prints_changes_otherwise() -> None:
    tty = io.StringIO()
    painter = Painter(tty, tty=True, columns=12)
    painter.paint(["a 1", "b 1"])
    painter.paint(["a 2", "b 2 and a long tail"])
    painter.done()
    painter.done()
    assert tty.getvalue() == "\ra 1\x1b[K\nb 1\x1b[K\x1b[1A\ra 2\x1b[K\nb 2 and a l\x1b[K\n"

    plain = io.StringIO()
    painter = Painter(plain, tty=False)
    painter.paint(["a [█] 1  Running  3/s  ETA 5s", "b 1"], ["a", "b"])
    painter.paint(["a [█] 1  Running  2/s  ETA 9s", "b 2"], ["a", "b"])  # a's bar did not change
    assert plain.getvalue() == "a [█] 1  Running  3/s  ETA 5s\nb 1\nb 2\n"


# ------------------------------------------------------------------------------------ output

ITEMS = [
    {
        "id": "a",
        "outcome": "failed",
        "reason": "Lost",
        "error": "Lost: x" * 20,
        "attempts": 2,
        "worker": "w",
        "finished": "t",
    },
    {
        "id": "b",
        "outcome": "pending",
        "reason": None,
        "error": None,
        "attempts": None,
        "worker": None,
        "finished": None,
    },
]


def pages() -> Iterator[Page]:
    yield Page("u-1", ITEMS[:1], "Yg")
    yield Page("u-1", ITEMS[1:], None)


@pytest.mark.parametrize("fmt", output.ITEM_FORMATS)
def test_items_in_every_format(fmt: str) -> None:
    import yaml

    out = io.StringIO()
    assert output.write_items(pages(), fmt, out) == (2, None)
    text = out.getvalue()
    if fmt == "json":
        assert json.loads(text) == {"uid": "u-1", "items": ITEMS}
    elif fmt == "jsonl":
        assert [json.loads(line) for line in text.splitlines()] == ITEMS
    elif fmt == "yaml":
        assert yaml.safe_load(text) == {"uid": "u-1", "items": ITEMS}
    elif fmt == "csv":
        assert text.splitlines()[0] == "id,outcome,reason,error,attempts,worker,finished"
        assert text.splitlines()[2] == "b,pending,,,,,"
    else:
        lines = text.splitlines()
        assert lines[0].split() == ["ID", "OUTCOME", "REASON", "ATTEMPTS", "WORKER", "FINISHED", "ERROR"]
        assert lines[1].endswith("…") is (fmt == "table")  # the error cut, in full with -o wide
        assert lines[2].split() == ["b", "pending", "-", "-", "-", "-", "-"]


def test_no_items_is_still_a_document() -> None:
    for fmt, text in (
        ("json", '{"uid": "u", "items": []}\n'),
        ("yaml", 'uid: "u"\nitems: []\n'),
        ("jsonl", ""),
    ):
        out = io.StringIO()
        output.write_items(iter([Page("u", [], None)]), fmt, out)
        assert out.getvalue() == text


def test_results_as_parquet_in_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    monkeypatch.setattr(output, "PARQUET_BATCH", 3)
    rows = [
        {
            "id": f"i{n}",
            "outcome": "succeeded",
            "reason": None,
            "error": None,
            "attempts": 1,
            "worker": "w",
            "finished": "2026-01-02T03:04:05.5Z",
            "result": {"n": n},
        }
        for n in range(7)
    ]
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    pieces = [body[i : i + 10] for i in range(0, len(body), 10)]  # lines cut anywhere
    path = tmp_path / "r.parquet"
    assert output.write_results(iter(pieces), "parquet", str(path)) == 7
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 7 and meta.num_row_groups == 3
    table = pq.read_table(path)
    assert table.column("id").to_pylist() == [f"i{n}" for n in range(7)]
    assert json.loads(table.column("result")[6].as_py()) == {"n": 6}
    assert table.column("finished")[0].as_py().isoformat() == "2026-01-02T03:04:05.500000+00:00"
    assert not (tmp_path / "r.parquet.part").exists()


def test_a_cut_export_leaves_no_file(tmp_path: Path) -> None:
    def broken() -> Iterator[bytes]:
        yield b'{"id": "a"}\n'
        raise ClientError("the answer broke off")

    with pytest.raises(ClientError):
        output.write_results(broken(), "jsonl", str(tmp_path / "r.jsonl"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ refusals


def transport(service: bool = False) -> ApiTransport:
    if not service:
        return ApiTransport(None, "http://127.0.0.1:9", token="t")
    conn: Any = type("Conn", (), {"host": "https://k:6443", "user": "ann", "api": None})()
    api = ApiTransport.__new__(ApiTransport)
    api.conn, api.service, api.base, api.timeout, api._token = (
        conn,
        ServiceRef("mljob", "mljob-operator-api"),
        "",
        1,
        "t",
    )
    return api


@pytest.mark.parametrize(
    ("status", "body", "cls", "message"),
    [
        (
            401,
            {"error": "no token"},
            Unauthorized,
            "the read-only API does not accept your token (no token): get a new one",
        ),
        (403, {"error": "nope"}, Forbidden, "your token may not get mljobs/j in namespace ns (nope)"),
        (404, {"error": "no MLJob 'j' in namespace 'ns'"}, NotFound, "no MLJob 'j' in namespace 'ns'"),
        (400, {"error": "limit: a whole number"}, UsageError, "limit: a whole number"),
        (429, {"error": "4 exports are running"}, Unavailable, "4 exports are running (retry after 5 s)"),
        (
            503,
            {"error": "not connected"},
            Unavailable,
            "the read-only API at http://127.0.0.1:9 could not answer (503)",
        ),
    ],
)
def test_the_apis_refusals(status: int, body: dict[str, Any], cls: type[ClientError], message: str) -> None:
    err = transport().error(status, json.dumps(body).encode(), {"Retry-After": "5"}, Target("ns", "j"))
    assert type(err) is cls and str(err).startswith(message)
    assert err.exit_code == (2 if cls is UsageError else 1)


@pytest.mark.parametrize(
    ("status", "cls", "pattern"),
    [
        (401, Unauthorized, r"the Kubernetes API at https://k:6443 does not accept the credentials of ann"),
        (
            403,
            Forbidden,
            r"your credentials \(ann\) may not use the service proxy to mljob/mljob-operator-api"
            r" .*port-forward",
        ),
        (
            404,
            NotFound,
            r"no read-only API Service mljob/mljob-operator-api \(m\): install the chart with"
            r" --set api.enabled=true",
        ),
        (
            503,
            Unavailable,
            r"the read-only API's Service mljob/mljob-operator-api has nothing to answer \(m\)",
        ),
    ],
)
def test_the_service_proxys_refusals(status: int, cls: type[ClientError], pattern: str) -> None:
    body = json.dumps({"kind": "Status", "message": "m", "code": status}).encode()
    err = transport(service=True).error(status, body, {}, Target("ns", "j"))
    assert type(err) is cls and re.match(pattern, str(err)), str(err)


def test_a_page_not_of_json() -> None:
    err = transport().error(502, b"<html>Bad gateway</html>", {}, Target("ns"))
    assert str(err) == "the read-only API at http://127.0.0.1:9 answered 502: <html>Bad gateway</html>"


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("mljob/api", ServiceRef("mljob", "api", "http")),
        ("ops/mljob-api:8080", ServiceRef("ops", "mljob-api", "8080")),
    ],
)
def test_service_refs(text: str, ref: ServiceRef) -> None:
    assert ServiceRef.parse(text) == ref
    assert ref.proxy_path() == f"/api/v1/namespaces/{ref.namespace}/services/{ref.name}:{ref.port}/proxy"


# ------------------------------------------------------------------------------------ kubeconfig


def kubeconfig(tmp_path: Path, user: dict[str, Any], namespace: str | None = "team-a") -> str:
    context: dict[str, Any] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [
            {"name": "main", "context": context},
            {"name": "other", "context": {"cluster": "c", "user": "u", "namespace": "b"}},
        ],
        "current-context": "main",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    return str(path)


def test_the_namespace_and_token_come_from_the_kubeconfig_as_kubectl_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = kubeconfig(tmp_path, {"token": "abc"})
    conn = connect(path)
    assert (conn.namespace, conn.user, conn.bearer_token()) == ("team-a", "u", "abc")
    assert connect(path, context="other").namespace == "b"
    assert connect(path, namespace="given").namespace == "given"
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent'}:{path}")  # a list, as kubectl takes it
    assert connect().namespace == "team-a"
    assert connect(kubeconfig(tmp_path, {"token": "t"}, namespace=None)).namespace == "default"
    assert (
        connect(
            kubeconfig(tmp_path, {"client-certificate-data": "eA==", "client-key-data": "eA=="})
        ).bearer_token()
        is None
    )
    with pytest.raises(UsageError, match="context 'nope' is not in"):
        connect(path, context="nope")
    with pytest.raises(UsageError, match="no kubeconfig at"):
        connect(str(tmp_path / "absent"))
