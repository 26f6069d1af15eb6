"""The job pages (`mljob api`'s /ui) in a real browser, on the real stack, with real tokens.

One job runs to its verdict on a real worker: 160 items, failing two ways (ids ending in 7 raise
a PermanentError: HandlerFailed; ids ending in 3 return a result Postgres refuses:
ResultRejected), plus one item whose id is markup. `mljob api` runs on the chart's own API
ServiceAccount; Debian's chromium, driven by Playwright, logs in with a `kubectl create token`
of a reader (get, list) and of a nobody (no Role), and the page must say what the MLJob status
and Postgres say. With MLJOB_PAGES_SCREENSHOT=PATH the job page's screenshot is also written
there (docs/job-page.png is one).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.api import MLJOBS, rbac_manifest, read_only_api, token
from support.browser import chromium
from support.env import E2E
from support.stack import Kubectl

PIPELINE = "pagestest"
NAME = "pages-job"
#: Markup in an id: the page must show it as text (and the browser must not run it).
EVIL = "<img src=x onerror=\"document.title='pwned'\">-217"
ITEMS = [f"p-{n:03d}" for n in range(160)] + [EVIL]
PAGE = 12
RELEASE = "pages"


@dataclass
class Served:
    e2e: E2E
    base: str
    tokens: dict[str, str]
    uid: str
    status: dict[str, Any]

    def url(self, path: str) -> str:
        return self.base + path

    def rows(self) -> dict[str, tuple[str, str | None]]:
        with self.e2e.pg() as conn:
            cur = conn.execute(
                "SELECT item_id, outcome, error FROM mljob_results WHERE job_uid = %s", (self.uid,)
            )
            return {item: (outcome, error) for item, outcome, error in cur.fetchall()}


@pytest.fixture(scope="module")
def served(e2e: E2E, kubectl: Kubectl) -> Iterator[Served]:
    """The job run to its verdict, and `mljob api` on a token of the chart's API ServiceAccount
    (support.api: the chart installed with api.enabled into the test's namespace, watching it
    only); a reader (get and list on MLJobs) and a nobody (no Role) in that namespace."""
    namespace = e2e.namespace
    uid = e2e.apply(NAME, PIPELINE, ITEMS)
    e2e.start_worker(PIPELINE, "two_reasons")
    with read_only_api(e2e, kubectl, RELEASE) as api:
        grants = [(namespace, "reader", [(MLJOBS, ["mljobs"], ["get", "list"])]), (namespace, "nobody", [])]
        kubectl.run("apply", "-f", "-", stdin=rbac_manifest(grants))
        tokens = {who: token(kubectl, namespace, who) for who in ("reader", "nobody")}
        status = e2e.wait_terminal(NAME, timeout=90)
        yield Served(e2e, api.base, tokens, uid, status)


def _ids(page: Any) -> list[str]:
    return [row.get_attribute("data-id") for row in page.locator("#failed tbody tr[data-id]").all()]


def _cell(page: Any, cell: str) -> int:
    return int(page.locator(f"#count-{cell}").inner_text().replace(",", ""))


def _login(page: Any, who_token: str) -> None:
    page.fill("#token", who_token)
    with page.expect_navigation():
        page.click("#login")


def test_the_job_page_in_a_browser(served: Served, tmp_path: Path) -> None:
    started = time.monotonic()
    ns = served.e2e.namespace
    rows = served.rows()
    assert len(rows) == len(ITEMS)
    failed = {item for item, (outcome, _) in rows.items() if outcome == "failed"}
    reasons = Counter(
        "ResultRejected" if (error or "").startswith("ResultRejected:") else "HandlerFailed"
        for item, (outcome, error) in rows.items()
        if outcome == "failed"
    )
    assert reasons == {"HandlerFailed": 17, "ResultRejected": 16}, reasons
    assert served.status["phase"] == "Succeeded" and served.status["failed"] == len(failed)

    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1000, "height": 1400}, accept_downloads=True)
        context.set_default_timeout(15_000)
        page = context.new_page()

        # No cookie yet: the list is the login form (401), which comes back to the list.
        answer = page.goto(served.url(f"/ui/namespaces/{ns}/mljobs"))
        assert answer is not None and answer.status == 401
        _login(page, served.tokens["reader"])
        assert page.url == served.url(f"/ui/namespaces/{ns}/mljobs")
        row = page.locator(f'#jobs tr[data-job="{NAME}"]')
        assert row.locator(".phase").inner_text() == "Succeeded"
        assert "signed in as system:serviceaccount:" in page.locator("header").inner_text()

        # The token is in an HttpOnly, SameSite=Strict cookie: no script of the page can read it.
        (cookie,) = context.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == ("mljob_token", True, "Strict")
        assert page.evaluate("document.cookie") == ""

        # The job page: its counts are the MLJob status's and Postgres' rows.
        with page.expect_navigation():
            row.locator("a").click()
        assert page.url == served.url(f"/ui/namespaces/{ns}/mljobs/{NAME}")
        page.goto(served.url(f"/ui/namespaces/{ns}/mljobs/{NAME}?limit={PAGE}"))
        status = served.status
        assert page.locator("#phase").inner_text() == "Succeeded"
        for what in ("total", "processed", "failed"):
            assert _cell(page, f"status-{what}") == status[what], what
        assert _cell(page, "postgres-total") == len(ITEMS)
        assert _cell(page, "postgres-succeeded") == len(rows) - len(failed)
        assert _cell(page, "postgres-failed") == len(failed)
        assert _cell(page, "postgres-pending") == 0
        shown = {
            r.get_attribute("data-reason"): int(r.locator("td.n").inner_text())
            for r in page.locator("#reasons tbody tr").all()
        }
        assert shown == dict(reasons)
        # The chart: drawn by the page's script from the same counts.
        bars = page.locator("#throughput svg g.bars > g")
        assert bars.count() >= 1
        points = page.evaluate("JSON.parse(document.getElementById('throughput').dataset.points).points")
        assert sum(p["succeeded"] for p in points) == len(rows) - len(failed)
        assert sum(p["failed"] for p in points) == len(failed)
        hourly = page.goto(served.url(f"/api/v1/namespaces/{ns}/mljobs/{NAME}/throughput?bucket=1h"))
        assert hourly is not None and hourly.status == 200
        data = hourly.json()  # the job took seconds: one bucket of an hour holds every result
        assert (data["uid"], data["bucket"], data["finished"]) == (served.uid, 3600, True)
        assert [(p["succeeded"], p["failed"]) for p in data["points"]] == [
            (len(rows) - len(failed), len(failed))
        ]
        page.go_back()

        # The markup in an id is text on the page, and the browser ran none of it.
        assert EVIL in failed
        assert page.title() != "pwned" and page.locator("#failed img").count() == 0
        evil_row = page.locator("#failed tbody tr").first  # '<' sorts before the other ids
        assert evil_row.locator("td.id").inner_text() == EVIL
        assert EVIL in evil_row.locator("td.err").inner_text()
        if os.environ.get("MLJOB_PAGES_SCREENSHOT"):
            page.screenshot(path=os.environ["MLJOB_PAGES_SCREENSHOT"], full_page=True)
        page.screenshot(path=str(tmp_path / "job-page.png"), full_page=True)

        # The failed items, a page at a time: "next" shows other ids, all pages the failed ones.
        pages = [_ids(page)]
        while page.locator("#next").count():
            with page.expect_navigation():
                page.click("#next")
            pages.append(_ids(page))
            assert not set(pages[-1]) & set(pages[-2]), "the next page shows other ids"
        seen = [item for ids in pages for item in ids]
        assert [len(ids) for ids in pages] == [PAGE, PAGE, len(failed) - 2 * PAGE]
        assert len(seen) == len(set(seen)) and set(seen) == failed

        # One reason: its items only, paged the same way.
        page.goto(served.url(f"/ui/namespaces/{ns}/mljobs/{NAME}?limit={PAGE}"))
        with page.expect_navigation():
            page.locator('#reasons tr[data-reason="ResultRejected"] a').click()
        rejected = {
            item for item, (o, e) in rows.items() if o == "failed" and (e or "").startswith("ResultRejected:")
        }
        ids = _ids(page)
        with page.expect_navigation():
            page.click("#next")
        assert set(ids + _ids(page)) == rejected

        # The results link downloads the export (the cookie goes with it).
        with page.expect_download() as download:
            page.click("#export-csv")
        exported = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        assert {line["id"]: line["outcome"] for line in exported} == {k: v[0] for k, v in rows.items()}

        # Logging out drops the cookie: the page is the login form again.
        with page.expect_navigation():
            page.click("header form.logout button")
        assert context.cookies() == []
        again = page.goto(served.url(f"/ui/namespaces/{ns}/mljobs/{NAME}"))
        assert again is not None and again.status == 401

        # A token without `get`: the same pages and links are 403.
        other = browser.new_context()
        page = other.new_page()
        page.goto(served.url("/ui/"))
        _login(page, served.tokens["nobody"])
        for path in (f"/ui/namespaces/{ns}/mljobs/{NAME}", f"/api/v1/namespaces/{ns}/mljobs/{NAME}/results"):
            refused = page.goto(served.url(path))
            assert refused is not None and refused.status == 403, path
            assert f"system:serviceaccount:{ns}:nobody may not get" in page.content()
        refused = page.goto(served.url(f"/ui/namespaces/{ns}/mljobs"))
        assert refused is not None and refused.status == 403
    assert time.monotonic() - started < 60
