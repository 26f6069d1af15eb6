"""The job pages over stand-ins (no apiserver, no stores): escaping, relative links, the login
and its cookie, the same 401/403 as the JSON routes, and the throughput's buckets. The real
stack in a real browser: tests/e2e/test_e2e_pages.py."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mljob.httpapi import auth, ledger, pages, params, render, routes, summary

pytestmark = pytest.mark.unit

UID = "11111111-1111-4111-8111-111111111111"
EVIL_ID = '<img src=x onerror="alert(1)">-7'
EVIL_ERROR = "</td><script>alert('x')</script>"


# ------------------------------------------------------------------------------------ pure parts


def test_el_escapes_every_text_and_attribute_once() -> None:
    cell = render.el("td", EVIL_ID, render.el("b", "&"), data_id=EVIL_ID, class_="n", hidden=True, id=None)
    assert cell == (
        '<td data-id="&lt;img src=x onerror=&quot;alert(1)&quot;&gt;-7" class="n" hidden>'
        "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;-7<b>&amp;</b></td>"
    )
    assert render.el("input", value="a\"b'c") == '<input value="a&quot;b&#x27;c">'


@pytest.mark.parametrize(
    ("here", "target", "link"),
    [
        ("/ui/", "/ui/login", "login"),
        ("/ui/login", "/ui/", "./"),
        ("/ui/login", "/ui/namespaces/a/mljobs?x=1", "namespaces/a/mljobs?x=1"),
        ("/ui/namespaces/a/mljobs/b", "/ui/login", "../../../login"),
        ("/ui/namespaces/a/mljobs/b", "/ui/static/", "../../../static/"),
        (
            "/ui/namespaces/a/mljobs/b",
            "/api/v1/namespaces/a/mljobs/b/results",
            "../../../../api/v1/namespaces/a/mljobs/b/results",
        ),
        ("/ui/namespaces/a/mljobs", "/ui/namespaces/a/mljobs/b", "mljobs/b"),
    ],
)
def test_links_are_relative_so_a_proxy_prefix_stays(here: str, target: str, link: str) -> None:
    assert render.rel(here, target) == link


@pytest.mark.parametrize(
    ("query", "seconds"),
    [
        ({}, None),
        ({"bucket": "10"}, 10),
        ({"bucket": "10s"}, 10),
        ({"bucket": "5m"}, 300),
        ({"bucket": "2h"}, 7200),
    ],
)
def test_throughput_bucket(query: dict[str, str], seconds: int | None) -> None:
    assert params.throughput_bucket(query) == seconds


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "ten", "5d", "", "9999999"])
def test_throughput_bucket_refuses(text: str) -> None:
    with pytest.raises(params.ParamError, match=r"^bucket: seconds expected"):
        params.throughput_bucket({"bucket": text})


@pytest.mark.parametrize(
    ("span", "asked", "width"),
    [
        (0, None, 1),
        (100, None, 1),  # 100 buckets
        (121, None, 2),
        (3600, None, 30),
        (86400, None, 900),
        (10**9, None, 97 * 86400),  # past the nice widths: whole days
        (100, 10, 10),
        (5000, 1, 5),  # 1 s would make 5,000 buckets: the smallest width that gives 1,000
        (100, 7, 7),
    ],
)
def test_bucket_width_bounds_the_buckets(span: float, asked: int | None, width: int) -> None:
    assert params.bucket_width(span, asked) == width
    assert span / width <= (params.MAX_BUCKETS if asked else params.AUTO_BUCKETS)


def test_the_token_is_read_from_the_cookie_after_the_headers() -> None:
    assert auth.bearer_token({}, {auth.COOKIE: "abc"}) == "abc"
    assert auth.bearer_token({"Authorization": "Bearer h"}, {auth.COOKIE: "c"}) == "h"
    assert auth.bearer_token({}, {auth.COOKIE: "two words"}) is None
    assert auth.bearer_token({}, {"other": "abc"}) is None


# --------------------------------------------------------------------------- pages over stand-ins


class Kube:
    """Reviews and MLJobs as the apiserver answers them."""

    def __init__(self) -> None:
        self.users = {"good": "alice", "nobody": "bob"}
        self.rights = {("alice", "get", "team-a", "job-1"), ("alice", "list", "team-a", None)}
        self.jobs = {("team-a", "job-1"): job()}

    async def review_token(self, token: str, timeout: float) -> dict[str, Any]:
        if token in self.users:
            return {"authenticated": True, "user": {"username": self.users[token]}}
        return {"authenticated": False, "error": "invalid bearer token"}

    async def review_access(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        attrs = spec["resourceAttributes"]
        key = (spec["user"], attrs["verb"], attrs["namespace"], attrs.get("name"))
        return {"allowed": key in self.rights}

    async def get_job(self, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any] | None:
        return self.jobs.get((namespace, name))

    async def list_jobs_page(
        self, namespace: str, limit: int, continue_token: str | None, timeout: float
    ) -> dict[str, Any]:
        return {"items": [j for (ns, _), j in self.jobs.items() if ns == namespace], "metadata": {}}


def job() -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "team-a",
            "name": "job-1",
            "uid": UID,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"pipeline": "thumbs"},
        "status": {"phase": "Succeeded", "total": 3, "processed": 3, "failed": 2, "progress": "100%"},
    }


def failed_page(after: str | None) -> dict[str, Any]:
    items = [
        {"id": EVIL_ID, "outcome": "failed", "reason": "HandlerFailed", "error": EVIL_ERROR, "attempts": 1},
        {"id": "z-9", "outcome": "failed", "reason": "Lost", "error": "Lost: gone", "attempts": 2},
    ]
    return {
        "uid": UID,
        "items": items[1:] if after else items[:1],
        "next": None if after else params.encode_cursor(EVIL_ID),
    }


@contextlib.asynccontextmanager
async def served(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[TestClient[Any, Any], list[Any]]]:
    kube = Kube()
    asked: list[Any] = []

    async def fake_summary(stores: Any, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "namespace": "team-a",
            "name": "job-1",
            "uid": UID,
            "pipeline": "thumbs",
            "phase": "Succeeded",
            "status": body["status"],
            "postgres": {
                "items": 3,
                "outcomes": {"succeeded": 1, "failed": 2, "pending": 0},
                "failedByReason": {"HandlerFailed": 1, "Lost": 1},
            },
            "redis": {"present": False},
            "nats": {"present": False},
            "errors": {},
            "disagreements": [],
        }

    async def fake_items(pool: Any, uid: str, query: params.ItemsQuery) -> dict[str, Any]:
        asked.append(query)
        return failed_page(query.after)

    async def fake_throughput(pool: Any, uid: str, bucket: int | None) -> dict[str, Any]:
        points = [{"start": "2026-01-01T00:00:00Z", "succeeded": 1, "failed": 2}]
        return {
            "uid": uid,
            "bucket": bucket or 1,
            "start": "x",
            "end": "y",
            "finished": True,
            "points": points,
        }

    monkeypatch.setattr(pages, "summary", fake_summary)
    monkeypatch.setattr(ledger, "items_page", fake_items)
    monkeypatch.setattr(ledger, "throughput", fake_throughput)
    state = routes.ApiState(reviewer=auth.Reviewer(kube, ttl=10), kube=kube)
    state.stores = summary.Stores(pool=object(), state=object(), js=object())  # type: ignore[arg-type]
    async with TestClient(TestServer(routes.make_app(state))) as client:
        yield client, asked


JOB = "/ui/namespaces/team-a/mljobs/job-1"


async def login(
    client: TestClient[Any, Any], token: str = "good", headers: dict[str, str] | None = None, **form: str
) -> Any:
    return await client.post(
        "/ui/login", data={"token": token, **form}, headers=headers, allow_redirects=False
    )


async def test_a_page_without_a_token_is_the_login_form_that_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with served(monkeypatch) as (client, _):
        answer = await client.get(JOB + "?reason=Lost")
        text = await answer.text()
        assert answer.status == 401 and 'action="../../../login"' in text
        assert "log in with a Kubernetes token to see this page" in text
        assert 'name="next" value="/ui/namespaces/team-a/mljobs/job-1?reason=Lost"' in text
        assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
        assert (await client.get("/ui/")).status == 200
        to = await client.get("/ui", allow_redirects=False)
        assert (to.status, to.headers["Location"]) == (303, "ui/")


async def test_the_login_sets_an_httponly_strict_cookie_and_goes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with served(monkeypatch) as (client, _):
        refused = await login(client, "forged")
        assert refused.status == 401 and "does not accept this token" in await refused.text()
        assert "Set-Cookie" not in refused.headers
        answer = await login(client, "Bearer good", next=JOB + "?limit=5", base="/")
        assert (answer.status, answer.headers["Location"]) == (303, "namespaces/team-a/mljobs/job-1?limit=5")
        cookie = answer.headers["Set-Cookie"]
        assert cookie.startswith(f"{auth.COOKIE}=good;")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # served over plain HTTP here
        behind = await login(client, next="https://elsewhere.example/", namespace="team-a", base="/p/x/")
        assert behind.headers["Location"] == "namespaces/team-a/mljobs"  # never another site
        assert "Path=/p/x/" in behind.headers["Set-Cookie"]
        tls = await login(client, headers={"X-Forwarded-Proto": "https"})
        assert "Secure" in tls.headers["Set-Cookie"]
        for bad in ("", "a b", "x" * 5000):
            assert (await login(client, bad)).status == 400
        crossed = await client.post(
            "/ui/login",
            data={"token": "good"},
            headers={"Sec-Fetch-Site": "cross-site"},
            allow_redirects=False,
        )
        assert crossed.status == 403 and "Set-Cookie" not in crossed.headers
        out = await client.post("/ui/logout", data={"base": "/p/x/"}, allow_redirects=False)
        dropped = out.headers.getall("Set-Cookie")
        assert out.status == 303 and len(dropped) == 2
        assert all(f'{auth.COOKIE}=""' in c for c in dropped) and any("Path=/p/x/" in c for c in dropped)


async def test_the_job_page_escapes_the_stores_data_and_pages_the_failed_items(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with served(monkeypatch) as (client, asked):
        client.session.cookie_jar.update_cookies({auth.COOKIE: "good"})
        answer = await client.get(JOB + "?limit=1")
        text = await answer.text()
        assert answer.status == 200, text
        assert EVIL_ID not in text and EVIL_ERROR not in text and "<script>alert" not in text
        assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;-7" in text
        assert re.search(r'id="count-status-failed">2<', text) and re.search(
            r'id="count-postgres-succeeded">1<', text
        )
        assert asked[-1] == params.ItemsQuery("failed", None, 1, None)
        next_link = re.search(r'<a href="([^"]+)" rel="next" id="next">', text)
        assert next_link and next_link.group(1) == "?limit=1&amp;after=" + params.encode_cursor(EVIL_ID)
        second = await client.get(JOB + "?limit=1&after=" + params.encode_cursor(EVIL_ID))
        assert "z-9" in await second.text() and asked[-1].after == EVIL_ID
        assert 'href="../../../../api/v1/namespaces/team-a/mljobs/job-1/results?format=csv"' in text
        assert "signed in as <strong>alice</strong>" in text
        reasons = await client.get(JOB + "?reason=Lost")
        assert reasons.status == 200 and asked[-1] == params.ItemsQuery("failed", "Lost", 50, None)
        assert (await client.get(JOB + "?reason=Nope")).status == 400
        assert (await client.get(JOB + "?page=2")).status == 400
        listing = await client.get("/ui/namespaces/team-a/mljobs")
        assert listing.status == 200 and 'href="mljobs/job-1"' in await listing.text()
        # The JSON routes take the same cookie.
        api = await client.get("/api/v1/namespaces/team-a/mljobs/job-1/throughput?bucket=5s")
        assert api.status == 200 and (await api.json())["bucket"] == 5
        assert (await client.get("/api/v1/namespaces/team-a/mljobs/job-1/throughput?bucket=x")).status == 400
        js = await client.get("/ui/static/page.js")
        assert js.status == 200 and js.headers["Content-Type"].startswith("text/javascript")
        assert (await client.get("/ui/static/other.js")).status == 404


async def test_a_token_without_get_sees_403_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    async with served(monkeypatch) as (client, _):
        client.session.cookie_jar.update_cookies({auth.COOKIE: "nobody"})
        answer = await client.get(JOB)
        text = await answer.text()
        assert answer.status == 403 and "bob may not get mljobs.mljob.dev &#x27;job-1&#x27;" in text
        relogin = re.search(r'<a href="([^"]+)" id="relogin">', text)
        assert (
            relogin and relogin.group(1) == "../../../login?next=%2Fui%2Fnamespaces%2Fteam-a%2Fmljobs%2Fjob-1"
        )
        form = await (await client.get("/ui/login?next=%2Fui%2Fnamespaces%2Fteam-a%2Fmljobs%2Fjob-1")).text()
        assert 'name="next" value="/ui/namespaces/team-a/mljobs/job-1"' in form and 'name="token"' in form
        assert (
            'name="next" value=""' in await (await client.get("/ui/login?next=//elsewhere.example/")).text()
        )
        assert (await client.get("/ui/namespaces/team-a/mljobs")).status == 403
        assert (await client.get("/api/v1/namespaces/team-a/mljobs/job-1")).status == 403
        client.session.cookie_jar.update_cookies({auth.COOKIE: "good"})
        assert (await client.get("/ui/namespaces/team-a/mljobs/job-2")).status == 403
        client.session.cookie_jar.update_cookies({auth.COOKIE: "forged"})
        assert (await client.get(JOB)).status == 401
