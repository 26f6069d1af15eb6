"""The read-only API (`mljob api`) against the real apiserver, stores, operator and a worker.

`mljob api` runs as a process on a token of the chart's own API ServiceAccount (the chart
installed with `api.enabled` into the test's namespace), so it works with exactly the chart's
RBAC. Callers are ServiceAccounts of two namespaces with tokens from the TokenRequest API
(`kubectl create token`): Kubernetes RBAC decides what each sees. Three small jobs: two finished
by a worker on one pipeline (one a tenth failed), one left pending on a pipeline no worker serves.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from support.api import MLJOBS, Rules, rbac_manifest, read_only_api, token
from support.env import E2E
from support.stack import Kubectl

RELEASE = "api"
PIPELINE, IDLE = "apitest", "apiidle"
A_ITEMS = [f"a-{n:03d}" for n in range(120)]  # tenth_fail: the ids ending in 7 fail
B_ITEMS = [f"b-{n:03d}" for n in range(40)]
IDLE_ITEMS = [f"c-{n:03d}" for n in range(25)]
PER_JOB = ("", "/items", "/results")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Api:
    e2e: E2E
    base: str
    tokens: dict[str, str]
    other_namespace: str
    uids: dict[str, str]

    def get(self, path: str, who: str | None = None, headers: dict[str, str] | None = None) -> Answer:
        sent = dict(headers or {})
        if who is not None:
            sent["Authorization"] = f"Bearer {self.tokens[who]}"
        request = urllib.request.Request(self.base + path, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return Answer(reply.status, dict(reply.headers), reply.read())
        except urllib.error.HTTPError as err:
            return Answer(err.code, dict(err.headers), err.read())

    def job(self, name: str, suffix: str = "", namespace: str | None = None) -> str:
        return f"/api/v1/namespaces/{namespace or self.e2e.namespace}/mljobs/{name}{suffix}"

    def rows(self, uid: str) -> dict[str, tuple[str, str | None]]:
        """Postgres' result rows of the job: id -> (outcome, error)."""
        with self.e2e.pg() as conn:
            cur = conn.execute("SELECT item_id, outcome, error FROM mljob_results WHERE job_uid = %s", (uid,))
            return {item: (outcome, error) for item, outcome, error in cur.fetchall()}


def _rbac(namespace: str, other: str) -> str:
    """A reader (get, list) and a lister (list only) in the job's namespace, a nobody there, and an
    outsider who may read the MLJobs of its own namespace only."""

    def mljobs(*verbs: str) -> Rules:
        return [(MLJOBS, ["mljobs"], list(verbs))]

    return rbac_manifest(
        [
            (namespace, "reader", mljobs("get", "list")),
            (namespace, "lister", mljobs("list")),
            (namespace, "nobody", []),
            (other, "outsider", mljobs("get", "list")),
        ]
    )


@pytest.fixture(scope="module")
def api(e2e: E2E, kubectl: Kubectl) -> Iterator[Api]:
    namespace = e2e.namespace
    other = f"{namespace}-other"
    kubectl.run("create", "namespace", other)
    with read_only_api(e2e, kubectl, RELEASE) as served_api:
        kubectl.run("apply", "-f", "-", stdin=_rbac(namespace, other))
        tokens = {name: token(kubectl, namespace, name) for name in ("reader", "lister", "nobody")}
        tokens["outsider"] = token(kubectl, other, "outsider")
        uids = {
            "api-a": e2e.apply("api-a", PIPELINE, A_ITEMS),
            "api-b": e2e.apply("api-b", PIPELINE, B_ITEMS),
            "api-idle": e2e.apply("api-idle", IDLE, IDLE_ITEMS),
        }
        e2e.start_worker(PIPELINE, "tenth_fail")
        served = Api(e2e, served_api.base, tokens, other, uids)
        for name in ("api-a", "api-b"):
            assert e2e.wait_terminal(name, timeout=90)["phase"] == "Succeeded"
        e2e.wait_phase("api-idle", {"Running"}, timeout=60)
        yield served


def test_no_token_is_401_with_a_bearer_challenge(api: Api) -> None:
    paths = [f"/api/v1/namespaces/{api.e2e.namespace}/mljobs", *(api.job("api-a", s) for s in PER_JOB)]
    for path in paths:
        answer = api.get(path)
        assert answer.status == 401, (path, answer.body)
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="mljob"'
        assert "kubectl create token" in answer.json()["error"]
    forged = api.get(api.job("api-a"), headers={"Authorization": "Bearer not-a-token"})
    assert forged.status == 401
    assert forged.headers["WWW-Authenticate"] == 'Bearer realm="mljob", error="invalid_token"'


def test_a_user_without_get_on_the_mljob_is_403(api: Api) -> None:
    for who in ("lister", "nobody"):
        for suffix in PER_JOB:
            answer = api.get(api.job("api-a", suffix), who)
            assert answer.status == 403, (who, suffix, answer.body)
            assert f"system:serviceaccount:{api.e2e.namespace}:{who} may not get" in answer.json()["error"]
    listing = f"/api/v1/namespaces/{api.e2e.namespace}/mljobs"
    assert api.get(listing, "nobody").status == 403
    names = {job["name"] for job in api.get(listing, "lister").json()["items"]}
    assert names == {"api-a", "api-b", "api-idle"}  # `list` is granted, `get` is not


def test_a_user_of_another_namespace_is_403(api: Api) -> None:
    for suffix in PER_JOB:
        answer = api.get(api.job("api-a", suffix), "outsider")
        assert answer.status == 403, (suffix, answer.body)
    assert api.get(f"/api/v1/namespaces/{api.e2e.namespace}/mljobs", "outsider").status == 403
    # A valid token, refused by RBAC and not 401: in its own namespace it gets past both reviews
    # and meets the installation's limit (the chart's watchNamespaces: the API may not read there).
    own = api.get(f"/api/v1/namespaces/{api.other_namespace}/mljobs", "outsider")
    assert own.status == 404 and "is not served by this API" in own.json()["error"]
    assert api.get(api.job("api-a", namespace=api.other_namespace), "outsider").status == 404


def test_a_reader_sees_exactly_its_jobs_items(api: Api) -> None:
    uid = api.uids["api-a"]
    rows = api.rows(uid)
    assert len(rows) == len(A_ITEMS)
    failed = {item for item, (outcome, _) in rows.items() if outcome == "failed"}
    assert failed == {item for item in A_ITEMS if item.endswith("7")}

    summary = api.get(api.job("api-a"), "reader").json()
    assert (summary["uid"], summary["phase"], summary["pipeline"]) == (uid, "Succeeded", PIPELINE)
    assert summary["postgres"]["items"] == len(A_ITEMS)
    assert summary["postgres"]["outcomes"] == {"succeeded": 108, "failed": 12, "pending": 0}
    assert summary["postgres"]["failedByReason"] == {"HandlerFailed": 12}
    assert summary["postgres"]["job"]["phase"] == "Succeeded"
    assert summary["redis"] == {"present": False}  # cleaned up
    assert summary["nats"]["present"] is False
    assert (summary["errors"], summary["disagreements"]) == ({}, [])

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        path = api.job("api-a", "/items?limit=7" + (f"&after={cursor}" if cursor else ""))
        page = api.get(path, "reader").json()
        assert page["uid"] == uid and len(page["items"]) <= 7
        seen += page["items"]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    ids = [item["id"] for item in seen]
    assert len(ids) == len(set(ids)) == len(A_ITEMS), "every item exactly once"
    assert ids == sorted(ids) and pages == -(-len(A_ITEMS) // 7)
    assert {item["id"]: item["outcome"] for item in seen} == {k: v[0] for k, v in rows.items()}
    assert {item["id"]: item["error"] for item in seen} == {k: v[1] for k, v in rows.items()}
    assert not any(item["id"].startswith("b-") for item in seen), "nothing of the other job"

    only_failed = api.get(api.job("api-a", "/items?outcome=failed&limit=1000"), "reader").json()
    assert {item["id"] for item in only_failed["items"]} == failed and only_failed["next"] is None
    assert {item["reason"] for item in only_failed["items"]} == {"HandlerFailed"}
    by_reason = api.get(api.job("api-a", "/items?reason=HandlerFailed&limit=1000"), "reader").json()
    assert by_reason["items"] == only_failed["items"]
    none_lost = api.get(api.job("api-a", "/items?reason=MaxDeliveriesExceeded"), "reader").json()
    assert none_lost == {"uid": uid, "items": [], "next": None}

    pending = api.get(api.job("api-idle", "/items?outcome=pending&limit=1000"), "reader").json()
    assert [item["id"] for item in pending["items"]] == IDLE_ITEMS
    idle = api.get(api.job("api-idle"), "reader").json()
    assert idle["redis"]["pending"] == len(IDLE_ITEMS) and idle["nats"]["present"] is True
    assert idle["nats"]["numPending"] == len(IDLE_ITEMS) and idle["disagreements"] == []

    exported = api.get(api.job("api-a", "/results"), "reader")
    assert exported.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in exported.body.decode().splitlines()]
    assert {line["id"]: line["outcome"] for line in lines} == {k: v[0] for k, v in rows.items()}
    assert lines[0]["result"] == {"id": "a-000", "double": 0}
    table = list(
        csv.DictReader(io.StringIO(api.get(api.job("api-a", "/results?format=csv"), "reader").body.decode()))
    )
    assert len(table) == len(A_ITEMS) and json.loads(table[1]["result"]) == {"id": "a-001", "double": 2}

    listing = api.get(f"/api/v1/namespaces/{api.e2e.namespace}/mljobs?limit=2", "reader").json()
    assert len(listing["items"]) == 2 and listing["next"]
    rest = api.get(
        f"/api/v1/namespaces/{api.e2e.namespace}/mljobs?continue={listing['next']}", "reader"
    ).json()
    jobs = {job["name"]: job for job in listing["items"] + rest["items"]}
    assert jobs["api-a"]["uid"] == uid and jobs["api-a"]["counts"] == {
        "total": 120,
        "processed": 120,
        "failed": 12,
    }
    stale = api.get(f"/api/v1/namespaces/{api.e2e.namespace}/mljobs?continue=bm90LWEtdG9rZW4", "reader")
    assert stale.status == 400 and stale.json()["error"].startswith("continue: not a token this API returned")
    assert api.get(api.job("no-such-job"), "reader").status == 404


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("outcome=bad", "outcome: one of succeeded, failed, pending expected, got 'bad'"),
        ("limit=0", "limit: a whole number from 1 to 1000 expected, got 0"),
        ("limit=5000", "limit: a whole number from 1 to 1000 expected, got 5000"),
        ("limit=ten", "limit: a whole number from 1 to 1000 expected, got 'ten'"),
        ("after=%21%21", "after: not a cursor this API returned"),
        ("reason=Oops", "reason: one of DeadlineExceeded, HandlerFailed, Lost,"),
        ("reason=Lost&outcome=succeeded", "reason: only failed items have one"),
        ("outcome=failed&outcome=pending", "outcome: given more than once"),
        ("outcomes=failed", "unknown parameter outcomes: this endpoint takes after, limit, outcome, reason"),
    ],
)
def test_bad_parameters_are_400_saying_what_to_fix(api: Api, query: str, names: str) -> None:
    answer = api.get(api.job("api-a", f"/items?{query}"), "reader")
    assert answer.status == 400
    assert answer.json()["error"].startswith(names)


def test_a_recreated_job_shows_its_own_items_only(api: Api) -> None:
    """Same namespace and name, a new UID: none of the old job's rows, which Postgres keeps."""
    old = api.uids["api-b"]
    api.e2e.kubectl.run("-n", api.e2e.namespace, "delete", "mljob", "api-b", "--wait=true", "--timeout=60s")
    new_items = ["n-1", "n-2", "n-3"]
    new = api.e2e.apply("api-b", IDLE, new_items)
    assert new != old and len(api.rows(old)) == len(B_ITEMS)
    api.e2e.wait_phase("api-b", {"Running"}, timeout=60)
    page = api.get(api.job("api-b", "/items"), "reader").json()
    assert page["uid"] == new
    assert [(item["id"], item["outcome"]) for item in page["items"]] == [(i, "pending") for i in new_items]
    assert api.get(api.job("api-b", "/results"), "reader").body == b""
    assert api.get(api.job("api-b"), "reader").json()["postgres"]["outcomes"]["succeeded"] == 0


def test_the_token_travels_in_x_mljob_token_through_the_service_proxy(api: Api) -> None:
    """The apiserver's service proxy removes `Authorization` once it has authenticated the
    caller: the API takes the same token from X-MLJob-Token."""
    header = {"X-MLJob-Token": api.tokens["reader"]}
    assert api.get(api.job("api-a"), headers=header).status == 200
    assert api.get(api.job("api-a"), headers={"X-MLJob-Token": api.tokens["outsider"]}).status == 403
    cursor = base64.urlsafe_b64encode(b"a-100").rstrip(b"=").decode()
    page = api.get(api.job("api-a", f"/items?after={cursor}&limit=3"), headers=header).json()
    assert [item["id"] for item in page["items"]] == ["a-101", "a-102", "a-103"]
