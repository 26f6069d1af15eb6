"""The read-only API's pure parts, table-driven: query parameters and the paging cursor, the
disagreement wording, the token header, the review cache; then the routes and a summary over
stand-ins (no apiserver, no stores): one store down blanks its part, never a 500."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mljob.httpapi import auth, ledger, params, routes, summary
from mljob.httpapi.disagree import KubeView, LedgerView, NatsView, RedisView, disagreements

pytestmark = pytest.mark.unit

REASONS = ledger.REASONS


# ------------------------------------------------------------------------------------ params


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, params.ItemsQuery(None, None, 100, None)),
        ({"outcome": "failed"}, params.ItemsQuery("failed", None, 100, None)),
        ({"outcome": "pending", "limit": "1"}, params.ItemsQuery("pending", None, 1, None)),
        ({"outcome": "succeeded", "limit": "1000"}, params.ItemsQuery("succeeded", None, 1000, None)),
        ({"reason": "Lost"}, params.ItemsQuery("failed", "Lost", 100, None)),
        (
            {"reason": "HandlerFailed", "outcome": "failed"},
            params.ItemsQuery("failed", "HandlerFailed", 100, None),
        ),
        ({"after": params.encode_cursor("img-7")}, params.ItemsQuery(None, None, 100, "img-7")),
    ],
)
def test_items_query_accepts(query: dict[str, str], expected: params.ItemsQuery) -> None:
    assert params.items_query(query, REASONS) == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"outcome": "done"}, "outcome: one of succeeded, failed, pending expected, got 'done'"),
        ({"outcome": ""}, "outcome: one of succeeded, failed, pending expected, got ''"),
        ({"limit": "0"}, "limit: a whole number from 1 to 1000 expected, got 0"),
        ({"limit": "1001"}, "limit: a whole number from 1 to 1000 expected, got 1001"),
        ({"limit": "-3"}, "limit: a whole number from 1 to 1000 expected, got -3"),
        ({"limit": "2.5"}, "limit: a whole number from 1 to 1000 expected, got '2.5'"),
        (
            {"reason": "Crashed"},
            "reason: one of DeadlineExceeded, HandlerFailed, Lost, MaxDeliveriesExceeded",
        ),
        ({"reason": "Lost", "outcome": "pending"}, "reason: only failed items have one"),
        ({"after": "###"}, "after: not a cursor this API returned"),
        ({"after": ""}, "after: not a cursor this API returned"),
        ({"after": "YQ=="}, "after: not a cursor this API returned"),  # padded: not what encode makes
        ({"after": "x" * 5000}, "after: not a cursor this API returned"),
        ({"page": "2"}, "unknown parameter page: this endpoint takes after, limit, outcome, reason"),
    ],
)
def test_items_query_refuses_saying_what_to_fix(query: dict[str, str], message: str) -> None:
    with pytest.raises(params.ParamError) as refused:
        params.items_query(query, REASONS)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    "item_id", ["a", "img-0001", "x/y?z=1&w", "ünïcødé", "a b", "=", "🙂" * 128, "i" * 512]
)
def test_cursor_round_trips_any_id(item_id: str) -> None:
    cursor = params.encode_cursor(item_id)
    assert cursor.isascii() and "=" not in cursor and "/" not in cursor and "+" not in cursor
    assert params.decode_cursor(cursor) == item_id


def test_cursor_refuses_non_utf8_and_overlong_ids() -> None:
    import base64

    for raw in (b"\xff\xfe", b"i" * 513):
        with pytest.raises(params.ParamError):
            params.decode_cursor(base64.urlsafe_b64encode(raw).rstrip(b"=").decode())


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, params.JobsQuery(500, None)),
        ({"limit": "10", "continue": "eyJ2"}, params.JobsQuery(10, "eyJ2")),
    ],
)
def test_jobs_query(query: dict[str, str], expected: params.JobsQuery) -> None:
    assert params.jobs_query(query) == expected


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: params.jobs_query({"limit": "5000"}), "limit: a whole number from 1 to 1000"),
        (lambda: params.jobs_query({"continue": ""}), "continue: pass the `next` of the page before"),
        (lambda: params.export_format({"format": "xlsx"}), "format: one of jsonl, csv expected, got 'xlsx'"),
        (lambda: params.export_format({"fmt": "csv"}), "unknown parameter fmt: this endpoint takes format"),
        (lambda: params.single([("limit", "1"), ("limit", "2")]), "limit: given more than once"),
    ],
)
def test_other_refusals(call: Any, message: str) -> None:
    with pytest.raises(params.ParamError, match=f"^{message}"):
        call()


def test_export_format_defaults_to_jsonl() -> None:
    assert (params.export_format({}), params.export_format({"format": "csv"})) == ("jsonl", "csv")


# ------------------------------------------------------------------------------ disagreements

DONE = KubeView("Succeeded", total=10, processed=10, failed=1)
RUNNING = KubeView("Running", total=10, processed=4, failed=0)
LEDGER_DONE = LedgerView("Succeeded", registered=10, succeeded=9, failed=1)
LEDGER_RUNNING = LedgerView("Running", registered=10, succeeded=5, failed=0)
GONE = RedisView(present=False)
NO_CONSUMER = NatsView(consumer=False)

DISAGREEMENTS = [
    # (kube, ledger, redis, nats, expected sentences (their beginnings), why)
    (DONE, LEDGER_DONE, GONE, NO_CONSUMER, [], "a finished, cleaned-up job agrees with itself"),
    (RUNNING, LEDGER_RUNNING, RedisView(True, 10, 5, 0), NatsView(True), [], "the MLJob's counts may trail"),
    (DONE, None, None, None, [], "no store read: nothing to compare"),
    (
        KubeView("Running", 10),
        LedgerView("Failed", 10, 3, 7),
        None,
        None,
        ["Postgres holds the verdict Failed, the MLJob still says Running: the operator writes it"],
        "the verdict not mirrored yet",
    ),
    (
        DONE,
        LedgerView("Running", 10, 9, 1),
        None,
        None,
        ["the MLJob says Succeeded, Postgres still says Running: the operator records"],
        "the MLJob's verdict not in the row yet",
    ),
    (
        KubeView("Cancelled", 10, 10, 0),
        LedgerView("Succeeded", 10, 10, 0),
        None,
        None,
        ["the MLJob says Cancelled, Postgres says Succeeded: Postgres decides the verdict"],
        "two verdicts",
    ),
    (
        KubeView("Running", 10),
        LedgerView(None, 0, 0, 0),
        None,
        None,
        ["Postgres has no row for this job, though the MLJob is Running"],
        "no row",
    ),
    (KubeView("Pending"), LedgerView(None, 0, 0, 0), None, None, [], "a pending job has no row yet"),
    (
        DONE,
        LedgerView("Succeeded", 1000010, 1000009, 1),
        None,
        None,
        [
            "the MLJob counts 10 processed and 1 failed, Postgres holds 1,000,010 results and 1 failures "
            "(1,000,000 arrived after the verdict",
            "the MLJob counts 10 items, Postgres registered 1,000,010",
        ],
        "late results, counted with separators",
    ),
    (
        DONE,
        LEDGER_DONE,
        RedisView(True, 10, 0, 1),
        NatsView(True),
        ["Redis still holds this finished job's state", "NATS still holds this finished job's consumer"],
        "cleanup not run yet",
    ),
    (
        RUNNING,
        LEDGER_RUNNING,
        GONE,
        NatsView(True),
        ["Redis has no state for this running job: the operator rebuilds it from Postgres"],
        "lost Redis state",
    ),
    (
        RUNNING,
        LEDGER_RUNNING,
        RedisView(True, 10, 6, 0),
        NatsView(True),
        ["Redis counts 6 items pending, Postgres 5: results are stored in Postgres first"],
        "Redis trails Postgres",
    ),
    (
        RUNNING,
        LEDGER_RUNNING,
        RedisView(True, 10, 2, 0),
        NatsView(True),
        ["Redis counts 2 items pending, Postgres 5 (items without a result)"],
        "Redis ahead of the ledger",
    ),
    (
        RUNNING,
        LEDGER_RUNNING,
        RedisView(True, 12, 5, 0),
        NatsView(True),
        ["Redis counts 12 items, Postgres registered 10"],
        "totals differ",
    ),
    (
        RUNNING,
        LEDGER_RUNNING,
        None,
        NO_CONSUMER,
        ["the job's consumer is gone from NATS while 5 items are pending: the operator recreates it"],
        "lost consumer",
    ),
    (RUNNING, LedgerView("Running", 10, 10, 0), None, NO_CONSUMER, [], "nothing pending: no consumer needed"),
    (
        RUNNING,
        None,
        None,
        NO_CONSUMER,
        ["the job's consumer is gone from NATS while items are pending"],
        "pending unknown (Postgres down)",
    ),
]


@pytest.mark.parametrize(
    ("kube", "ledger_view", "redis", "nats", "expected", "why"),
    DISAGREEMENTS,
    ids=[case[-1] for case in DISAGREEMENTS],
)
def test_disagreements(
    kube: KubeView,
    ledger_view: LedgerView | None,
    redis: RedisView | None,
    nats: NatsView | None,
    expected: list[str],
    why: str,
) -> None:
    found = disagreements(kube, ledger_view, redis, nats)
    assert len(found) == len(expected), (why, found)
    for sentence, beginning in zip(found, expected, strict=True):
        assert sentence.startswith(beginning), (why, sentence)


# ----------------------------------------------------------------------------- tokens, reviews


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({}, None),
        ({"Authorization": "Bearer abc.def"}, "abc.def"),
        ({"Authorization": "bearer   abc  "}, "abc"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, None),
        ({"Authorization": "Bearer"}, None),
        ({"X-MLJob-Token": "abc"}, "abc"),
        ({"X-MLJob-Token": "Bearer abc"}, "abc"),
        ({"X-MLJob-Token": "two words"}, None),
        ({"Authorization": "Bearer first", "X-MLJob-Token": "second"}, "first"),
    ],
)
def test_bearer_token(headers: dict[str, str], token: str | None) -> None:
    assert auth.bearer_token(headers) == token


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ttl_cache_expires_and_stays_bounded() -> None:
    clock = Clock()
    cache: auth.TTLCache[int] = auth.TTLCache(ttl=10, size=3, clock=clock)
    for n in range(5):
        cache.put(n, n)
    assert len(cache) == 3 and cache.get(0) == (False, None) and cache.get(4) == (True, 4)
    clock.now += 10
    assert cache.get(4) == (False, None)
    off: auth.TTLCache[int] = auth.TTLCache(ttl=0, clock=clock)
    off.put("k", 1)
    assert off.get("k") == (False, None)


class FakeKube:
    """Reviews as an apiserver answers them: tokens known by value, rights as (user, verb, ns, name)."""

    def __init__(self) -> None:
        self.users = {"good": {"username": "alice", "uid": "u-1", "groups": ["devs"], "extra": {"k": ["v"]}}}
        self.rights = {("alice", "get", "team-a", "job-1"), ("alice", "list", "team-a", None)}
        self.token_reviews = 0
        self.access_specs: list[dict[str, Any]] = []
        self.down = False
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}

    async def review_token(self, token: str, timeout: float) -> dict[str, Any]:
        self.token_reviews += 1
        if self.down:
            raise ConnectionError("apiserver down")
        if token in self.users:
            return {"authenticated": True, "user": self.users[token]}
        return {"authenticated": False, "error": "invalid bearer token"}

    async def review_access(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.access_specs.append(spec)
        if self.down:
            raise ConnectionError("apiserver down")
        attrs = spec["resourceAttributes"]
        key = (spec["user"], attrs["verb"], attrs["namespace"], attrs.get("name"))
        return {"allowed": key in self.rights, "reason": "" if key in self.rights else "no RBAC rule"}

    async def get_job(self, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any] | None:
        return self.jobs.get((namespace, name))

    async def list_jobs_page(
        self, namespace: str, limit: int, continue_token: str | None, timeout: float
    ) -> dict[str, Any]:
        return {"items": [j for (ns, _), j in self.jobs.items() if ns == namespace], "metadata": {}}


async def test_reviews_are_cached_by_token_hash_refusals_too_outages_never() -> None:
    kube, clock = FakeKube(), Clock()
    reviewer = auth.Reviewer(kube, ttl=10, clock=clock)
    user = await reviewer.user("good")
    assert user == auth.User("alice", "u-1", ("devs",), {"k": ("v",)})
    assert await reviewer.user("good") == user and kube.token_reviews == 1
    assert "good" not in repr(reviewer.users._entries) and auth.token_key("good") in reviewer.users._entries
    for _ in range(2):
        with pytest.raises(
            auth.Unauthenticated, match=r"does not accept this token \(invalid bearer token\)"
        ):
            await reviewer.user("bad")
    assert kube.token_reviews == 2  # the refusal was cached
    with pytest.raises(auth.Unauthenticated, match=r"^no token"):
        await reviewer.user(None)

    await reviewer.require("good", user, "get", "team-a", "job-1")
    await reviewer.require("good", user, "get", "team-a", "job-1")
    assert len(kube.access_specs) == 1
    assert kube.access_specs[0] == {
        "user": "alice",
        "uid": "u-1",
        "groups": ["devs"],
        "extra": {"k": ["v"]},
        "resourceAttributes": {
            "group": "mljob.dev",
            "resource": "mljobs",
            "verb": "get",
            "namespace": "team-a",
            "name": "job-1",
        },
    }
    with pytest.raises(
        auth.Forbidden, match=r"^alice may not get mljobs.mljob.dev 'job-2' in namespace 'team-a'"
    ):
        await reviewer.require("good", user, "get", "team-a", "job-2")

    clock.now += 10  # expired: asked again, and an outage is answered 503, not cached
    kube.down = True
    with pytest.raises(auth.ReviewUnavailable, match="cannot ask the Kubernetes API who this token is"):
        await reviewer.user("good")
    kube.down = False
    assert await reviewer.user("good") == user and kube.token_reviews == 4


# ------------------------------------------------------------------------ routes over stand-ins


@contextlib.asynccontextmanager
async def client(state: routes.ApiState) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(routes.make_app(state))) as test_client:
        yield test_client


def job(uid: str = "11111111-1111-4111-8111-111111111111") -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "team-a",
            "name": "job-1",
            "uid": uid,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"pipeline": "thumbs"},
        "status": {"phase": "Running", "total": 3, "processed": 1, "failed": 0},
    }


async def test_routes_answer_401_403_404_and_503_before_the_stores() -> None:
    kube = FakeKube()
    state = routes.ApiState(reviewer=auth.Reviewer(kube, ttl=10), kube=kube)
    good = {"Authorization": "Bearer good"}
    async with client(state) as http:
        assert (await http.get("/healthz")).status == 200
        assert (await (await http.get("/readyz")).json())["status"] == "not ready"
        reply = await http.get("/api/v1/namespaces/team-a/mljobs/job-1")
        assert reply.status == 401 and reply.headers["WWW-Authenticate"] == 'Bearer realm="mljob"'
        assert (await http.get("/api/v1/namespaces/team-a/mljobs/job-2", headers=good)).status == 403
        assert (await http.get("/api/v1/namespaces/team-b/mljobs", headers=good)).status == 403
        missing = await http.get("/api/v1/namespaces/team-a/mljobs/job-1", headers=good)
        assert (missing.status, (await missing.json())["code"]) == (404, 404)
        kube.jobs[("team-a", "job-1")] = job()
        early = await http.get("/api/v1/namespaces/team-a/mljobs/job-1/items", headers=good)
        assert early.status == 503 and "not connected to the stores yet" in (await early.json())["error"]
        bad = await http.get("/api/v1/namespaces/team-a/mljobs/job-1/items?outcome=x", headers=good)
        assert bad.status == 400
        listing = await (await http.get("/api/v1/namespaces/team-a/mljobs", headers=good)).json()
        assert listing["items"][0]["counts"] == {"total": 3, "processed": 1, "failed": 0}
        assert (await http.get("/nowhere")).status == 404
        kube.down = True
        state.reviewer.users._entries.clear()
        assert (await http.get("/api/v1/namespaces/team-a/mljobs/job-1", headers=good)).status == 503


class DownPool:
    """A pool whose server is gone: every connection attempt fails at once."""

    conninfo = "postgresql://mljob@db.invalid/mljob"
    timeout = 1.0

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[Any]:
        raise psycopg.OperationalError("connection refused")
        yield  # pragma: no cover


class DownState:
    async def counts(self, uid: str) -> Any:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


class SlowNats:
    asked: list[str] = []

    async def consumer_info(self, stream: str, consumer: str, timeout: float | None = None) -> Any:
        self.asked.append(consumer)

        class Info:
            num_pending, num_ack_pending, num_redelivered = 2, 1, 0

        return Info()


async def test_a_store_down_blanks_its_part_never_the_summary() -> None:
    stores = summary.Stores(pool=DownPool(), state=DownState(), js=SlowNats())  # type: ignore[arg-type]
    answer = await summary.summary(stores, job())
    assert answer["postgres"] is None and answer["redis"] is None
    assert answer["nats"] == {
        "stream": "MLJOB_TASKS_thumbs",
        "consumer": "workers-11111111-1111-4111-8111-111111111111",
        "present": True,
        "numPending": 2,
        "numAckPending": 1,
        "numRedelivered": 0,
    }
    assert answer["errors"] == {
        "postgres": "Postgres: OperationalError: connection refused",
        "redis": "Redis: ConnectionError: Error 111 connecting to 127.0.0.1:6379. Connection refused.",
    }
    assert answer["disagreements"] == []
    replaced = job()
    replaced["status"]["consumerGeneration"] = 2  # the operator replaced the consumer twice
    assert (await summary.summary(stores, replaced))["nats"]["consumer"].endswith("-r2")
    assert SlowNats.asked[-1] == "workers-11111111-1111-4111-8111-111111111111-r2"


def test_export_rows_encode_as_jsonl_and_csv() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    rows = [
        ("a", "succeeded", None, 1, "w-1", at, '{"x": [1, 2]}'),
        ('b,"c"', "failed", "Lost: no worker answered", 2, "mljob-operator", at, None),
    ]
    lines = ledger.encode_rows(rows, "jsonl").decode().splitlines()
    import json

    assert [json.loads(line) for line in lines] == [
        {
            "id": "a",
            "outcome": "succeeded",
            "reason": None,
            "error": None,
            "attempts": 1,
            "worker": "w-1",
            "finished": "2026-01-02T03:04:05.600000Z",
            "result": {"x": [1, 2]},
        },
        {
            "id": 'b,"c"',
            "outcome": "failed",
            "reason": "Lost",
            "error": "Lost: no worker answered",
            "attempts": 2,
            "worker": "mljob-operator",
            "finished": "2026-01-02T03:04:05.600000Z",
            "result": None,
        },
    ]
    import csv
    import io

    table = list(csv.reader(io.StringIO((ledger.csv_header() + ledger.encode_rows(rows, "csv")).decode())))
    assert table[0] == list(ledger.EXPORT_COLUMNS)
    assert table[2] == [
        'b,"c"',
        "failed",
        "Lost",
        "Lost: no worker answered",
        "2",
        "mljob-operator",
        "2026-01-02T03:04:05.600000Z",
        "",
    ]


def test_mljob_api_refuses_a_bad_setting_before_connecting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mljob.cli import main as cli

    monkeypatch.setenv("MLJOB_API_PORT", "0")
    assert cli.main(["api"]) == 2
    assert (
        capsys.readouterr().err
        == "error: MLJOB_API_PORT: input should be greater than or equal to 1, got '0'\n"
    )
    assert cli.main(["api", "--port", "http"]) == 2
    assert "--port: input should be a valid integer" in capsys.readouterr().err
