"""The job pages' HTML, from the same answers the JSON routes give (pure: no I/O).

Everything that comes from the stores or the MLJob (names, item ids, errors, reasons, messages)
is user data: it only ever reaches the page through `el`, which escapes every text and attribute
value; `Html` marks what is already markup (made by `el`), so nothing is escaped twice or never.
Links are relative to the page that carries them (`rel`): the pages work unchanged behind the
apiserver's service proxy, whose path prefix the API never sees.

The pages need no JavaScript to be read: the one script (`static/page.js`) draws the throughput
chart from the points in its `data-points` attribute and fills the login form's cookie path.
"""

from __future__ import annotations

import html
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

UI = "/ui"
START = UI + "/"
LOGIN = UI + "/login"
LOGOUT = UI + "/logout"
STATIC = UI + "/static"
TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled"})
#: What a table shows for a count or time nobody has (an en dash).
NONE = "\u2013"
#: While a job runs its page reloads itself this often.
REFRESH_SECONDS = 10


class Html(str):
    """Markup: made by `el` (or `page`), never escaped again."""


def _text(child: Any) -> str:
    if child is None or child is False:
        return ""
    if isinstance(child, Html):
        return child
    if isinstance(child, str | int | float):
        return html.escape(str(child), quote=True)
    return "".join(_text(c) for c in child)


VOID = frozenset({"input", "meta", "link", "br"})


def el(tag: str, *children: Any, **attrs: Any) -> Html:
    """`<tag attrs>children</tag>`: text children and every attribute value escaped; `class_`
    is `class`, `data_x` is `data-x`; an attribute None or False is left out, True is bare."""
    parts = [tag]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        name = key.rstrip("_").replace("_", "-")
        parts.append(name if value is True else f'{name}="{html.escape(str(value), quote=True)}"')
    head = "<" + " ".join(parts) + ">"
    if tag in VOID:
        return Html(head)
    return Html(f"{head}{_text(children)}</{tag}>")


def rel(here: str, target: str) -> str:
    """The relative URL from the page at path `here` to `target` (a path, with a query maybe)."""
    path, mark, query = target.partition("?")
    out = posixpath.relpath(path, posixpath.dirname(here) or "/")
    if path.endswith("/"):
        out = out.rstrip("/") + "/" if out != "." else "./"
    return out + mark + query


def jobs_path(namespace: str) -> str:
    return f"{UI}/namespaces/{quote(namespace, safe='')}/mljobs"


def job_path(namespace: str, name: str) -> str:
    return f"{jobs_path(namespace)}/{quote(name, safe='')}"


def api_path(namespace: str, name: str, suffix: str = "") -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/mljobs/{quote(name, safe='')}{suffix}"


def number(value: Any) -> str:
    """An integer with thousands separators, NONE for none."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else NONE


def when(value: Any) -> str:
    """An RFC 3339 time as `2026-01-02 03:04:05Z` (seconds), NONE for none."""
    if not isinstance(value, str) or not value:
        return NONE
    day, _, clock = value.partition("T")
    clock = clock.split(".")[0].rstrip("Z")
    return f"{day} {clock[:8]}Z" if clock else day


@dataclass(frozen=True)
class Chrome:
    """What every page carries: where it is (links are relative to it) and who is signed in."""

    here: str
    user: str | None = None


def page(chrome: Chrome, title: str, *body: Any, refresh: int | None = None) -> Html:
    """A whole document: the stylesheet and script from /ui/static, a header with who is signed
    in and a log-out button, then `body`."""
    static = rel(chrome.here, STATIC + "/")
    signed = (
        el(
            "form",
            el("span", "signed in as ", el("strong", chrome.user), class_="who"),
            el("input", type="hidden", name="base", value=""),
            el("button", "log out", type="submit"),
            method="post",
            action=rel(chrome.here, LOGOUT),
            class_="logout",
            data_here=chrome.here,
        )
        if chrome.user
        else ""
    )
    head = el(
        "head",
        el("meta", charset="utf-8"),
        el("meta", name="viewport", content="width=device-width, initial-scale=1"),
        el("meta", http_equiv="refresh", content=str(refresh)) if refresh else None,
        el("title", title, " · mljob"),
        el("link", rel="stylesheet", href=static + "page.css"),
        el("script", src=static + "page.js", defer=True),
    )
    top = el("header", el("a", "mljob", href=rel(chrome.here, START), class_="brand"), signed)
    return Html("<!DOCTYPE html>\n" + el("html", head, el("body", top, el("main", *body)), lang="en"))


def login_page(
    chrome: Chrome, *, message: str | None = None, next_path: str | None = None, namespace: str = ""
) -> Html:
    """The login form: a Kubernetes token (kept in an HttpOnly cookie, never in a URL) and the
    namespace to look at."""
    form = el(
        "form",
        el(
            "label",
            "Kubernetes token ",
            el("input", type="password", name="token", id="token", autocomplete="off", required=True),
        ),
        el(
            "label", "namespace ", el("input", type="text", name="namespace", id="namespace", value=namespace)
        ),
        el("input", type="hidden", name="next", value=next_path or ""),
        el("input", type="hidden", name="base", value=""),
        el("button", "log in", type="submit", id="login"),
        method="post",
        action=rel(chrome.here, LOGIN),
        class_="login",
        data_here=chrome.here,
    )
    return page(
        chrome,
        "log in",
        el("h1", "Log in"),
        el("p", message, class_="error", id="error") if message else None,
        el(
            "p",
            "The pages show what Kubernetes RBAC lets this token see: ",
            el("code", "get"),
            " on an MLJob for its page, ",
            el("code", "list"),
            " for a namespace's list. E.g. ",
            el("code", "kubectl -n NAMESPACE create token ACCOUNT"),
            ". The token stays in this browser's cookie for this site, never in a URL.",
        ),
        form,
    )


def start_page(chrome: Chrome, namespace: str = "") -> Html:
    """Signed in: which namespace to look at."""
    return page(
        chrome,
        "namespaces",
        el("h1", "MLJobs"),
        el(
            "form",
            el(
                "label",
                "namespace ",
                el("input", type="text", name="namespace", value=namespace, required=True),
            ),
            el("button", "show its MLJobs", type="submit"),
            method="get",
            action=rel(chrome.here, START),
        ),
    )


def error_page(chrome: Chrome, code: int, message: str, next_path: str | None = None) -> Html:
    """A refusal (403, 404, 400, 503) with the API's message, and a way to log in as someone else
    that comes back here."""
    what = {403: "Not allowed", 404: "Not found", 400: "Bad request", 503: "Unavailable"}.get(code, "Error")
    login = rel(chrome.here, LOGIN) + ("?" + urlencode({"next": next_path}) if next_path else "")
    return page(
        chrome,
        f"{code} {what}",
        el("h1", f"{code} {what}"),
        el("p", message, class_="error", id="error"),
        el("p", el("a", "log in with another token", href=login, id="relogin")),
    )


def _progress(counts: Mapping[str, Any]) -> Html:
    total, processed = counts.get("total"), counts.get("processed")
    if not isinstance(total, int) or not isinstance(processed, int) or total <= 0:
        return el("span", NONE)
    return el("progress", f"{processed * 100 // total}%", max=str(total), value=str(processed))


def jobs_page(chrome: Chrome, namespace: str, listing: Mapping[str, Any]) -> Html:
    """The namespace's MLJobs (the JSON listing's `items`), a page at a time (`continue`)."""
    rows = []
    for job in listing.get("items") or []:
        counts = job.get("counts") or {}
        rows.append(
            el(
                "tr",
                el("td", el("a", job.get("name"), href=rel(chrome.here, job_path(namespace, job["name"])))),
                el("td", job.get("pipeline")),
                el("td", job.get("phase") or "Pending", class_=f"phase {job.get('phase') or 'Pending'}"),
                el("td", _progress(counts), " ", job.get("progress") or ""),
                el("td", number(counts.get("processed")), class_="n"),
                el("td", number(counts.get("failed")), class_="n"),
                el("td", number(counts.get("total")), class_="n"),
                el("td", when(job.get("created"))),
                data_job=job.get("name"),
            )
        )
    table = el(
        "table",
        el(
            "thead",
            el(
                "tr",
                *(
                    el("th", h)
                    for h in (
                        "name",
                        "pipeline",
                        "phase",
                        "progress",
                        "processed",
                        "failed",
                        "total",
                        "created",
                    )
                ),
            ),
        ),
        el("tbody", rows or el("tr", el("td", "no MLJobs in this namespace", colspan="8"))),
        id="jobs",
    )
    more = listing.get("next")
    return page(
        chrome,
        f"MLJobs in {namespace}",
        el("h1", "MLJobs in ", el("code", namespace)),
        table,
        el("p", el("a", "next page", href="?" + urlencode({"continue": more}), rel="next", id="next"))
        if more
        else None,
    )


@dataclass(frozen=True)
class FailedView:
    """The failed-items table's page: the reason shown (None: all), its size, its cursor."""

    reason: str | None
    limit: int
    after: str | None


def _query(view: FailedView, limit_default: int, **changes: Any) -> str:
    values = {"reason": view.reason, "limit": view.limit if view.limit != limit_default else None}
    values.update(changes)
    return "?" + urlencode({k: v for k, v in values.items() if v is not None})


def _counts(summary: Mapping[str, Any]) -> Html:
    """MLJob status, Postgres and Redis counts side by side; cells `count-<store>-<what>`."""
    status = summary.get("status") or {}
    pg = summary.get("postgres") or None
    redis = summary.get("redis") or None
    stores: dict[str, dict[str, Any]] = {}
    total, processed, failed = status.get("total"), status.get("processed"), status.get("failed")
    stores["status"] = {
        "total": total,
        "processed": processed,
        "succeeded": processed - (failed or 0) if isinstance(processed, int) else None,
        "failed": failed,
        "pending": total - processed if isinstance(total, int) and isinstance(processed, int) else None,
    }
    if pg is not None:
        outcomes = pg.get("outcomes") or {}
        stores["postgres"] = {
            "total": pg.get("items"),
            "processed": (outcomes.get("succeeded") or 0) + (outcomes.get("failed") or 0),
            "succeeded": outcomes.get("succeeded"),
            "failed": outcomes.get("failed"),
            "pending": outcomes.get("pending"),
        }
    if redis is not None and redis.get("present"):
        rt, rp, rf = redis.get("total"), redis.get("processed"), redis.get("failed")
        stores["redis"] = {
            "total": rt,
            "processed": rp,
            "succeeded": rp - (rf or 0) if isinstance(rp, int) else None,
            "failed": rf,
            "pending": redis.get("pending"),
        }
    heads = {"status": "MLJob status", "postgres": "Postgres", "redis": "Redis"}
    rows = [
        el(
            "tr",
            el("th", what),
            *(
                el("td", number(values.get(what)), class_="n", id=f"count-{store}-{what}")
                for store, values in stores.items()
            ),
        )
        for what in ("total", "processed", "succeeded", "failed", "pending")
    ]
    return el(
        "table",
        el("thead", el("tr", el("th", ""), *(el("th", heads[store]) for store in stores))),
        el("tbody", rows),
        id="counts",
    )


def _stores_note(summary: Mapping[str, Any]) -> Html:
    redis, nats = summary.get("redis"), summary.get("nats")
    notes = []
    if redis is not None and not redis.get("present"):
        notes.append(el("li", "Redis: no state (a finished job's is cleaned up)"))
    if nats is not None:
        if nats.get("present"):
            notes.append(
                el(
                    "li",
                    "NATS consumer ",
                    el("code", nats.get("consumer")),
                    f": {number(nats.get('numPending'))} queued, {number(nats.get('numAckPending'))} "
                    f"with workers, {number(nats.get('numRedelivered'))} redelivered",
                )
            )
        else:
            notes.append(el("li", "NATS: no consumer (a finished job's is cleaned up)"))
    for store, error in sorted((summary.get("errors") or {}).items()):
        notes.append(el("li", f"{store} could not be read: ", error, class_="error"))
    for sentence in summary.get("disagreements") or []:
        notes.append(el("li", sentence, class_="disagreement"))
    return el("ul", notes, class_="notes") if notes else Html("")


def _chart(chrome: Chrome, summary: Mapping[str, Any], throughput: Mapping[str, Any] | None) -> Html:
    if throughput is None:
        return el("p", "the throughput could not be read", class_="error")
    points = list(throughput.get("points") or [])
    width = throughput.get("bucket")
    if not points or not width:
        return el("p", "no results recorded yet", id="throughput")
    peak = max(p["succeeded"] + p["failed"] for p in points) / width
    total = sum(p["succeeded"] + p["failed"] for p in points)
    data = {"bucket": width, "start": throughput.get("start"), "points": points}
    return el(
        "figure",
        el("div", class_="chart"),
        el(
            "figcaption",
            f"results recorded per second, in {width} s buckets (Postgres' clock): {total:,} over "
            f"{len(points) * width:,} s, at most {peak:,.1f}/s. ",
            el(
                "a",
                "as JSON",
                href=rel(
                    chrome.here,
                    api_path(summary["namespace"], summary["name"], f"/throughput?bucket={width}"),
                ),
            ),
        ),
        id="throughput",
        data_points=json.dumps(data, separators=(",", ":")),
    )


def _reasons(chrome: Chrome, summary: Mapping[str, Any], view: FailedView, limit_default: int) -> Html:
    by_reason = ((summary.get("postgres") or {}).get("failedByReason")) or {}
    if not by_reason:
        return el("p", "no failed items", id="reasons")
    rows = [
        el(
            "tr",
            el("td", el("a", reason, href=_query(view, limit_default, reason=reason, after=None))),
            el("td", number(count), class_="n"),
            class_="shown" if reason == view.reason else None,
            data_reason=reason,
        )
        for reason, count in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return el(
        "table",
        el("thead", el("tr", el("th", "reason"), el("th", "failed"))),
        el("tbody", rows),
        el(
            "tfoot",
            el(
                "tr",
                el("td", el("a", "all reasons", href=_query(view, limit_default, reason=None, after=None))),
                el("td", number(sum(by_reason.values())), class_="n"),
            ),
        ),
        id="reasons",
    )


def _failed_table(failed: Mapping[str, Any], view: FailedView, limit_default: int) -> Html:
    rows = [
        el(
            "tr",
            el("td", el("code", item.get("id")), class_="id"),
            el("td", item.get("reason")),
            el("td", item.get("error"), class_="err"),
            el("td", number(item.get("attempts")), class_="n"),
            el("td", item.get("worker")),
            el("td", when(item.get("finished"))),
            data_id=item.get("id"),
        )
        for item in failed.get("items") or []
    ]
    more = failed.get("next")
    links = [
        el("a", "first page", href=_query(view, limit_default, after=None), id="first")
        if view.after
        else None,
        el("a", "next page", href=_query(view, limit_default, after=more), rel="next", id="next")
        if more
        else None,
    ]
    return el(
        "div",
        el(
            "table",
            el(
                "thead",
                el(
                    "tr",
                    *(el("th", h) for h in ("item", "reason", "error", "attempts", "worker", "finished")),
                ),
            ),
            el("tbody", rows or el("tr", el("td", "none", colspan="6"))),
            id="failed",
        ),
        el("p", *(link for link in links if link), class_="paging") if any(links) else None,
    )


def job_page(
    chrome: Chrome,
    summary: Mapping[str, Any],
    failed: Mapping[str, Any],
    throughput: Mapping[str, Any] | None,
    view: FailedView,
    limit_default: int,
) -> Html:
    """One job: its facts and conditions, progress, counts per store, throughput, failed items
    by reason (a page of them, with their errors) and the links to its results export."""
    namespace, name = str(summary["namespace"]), str(summary["name"])
    status = summary.get("status") or {}
    phase = summary.get("phase") or "Pending"
    facts = [
        ("namespace", el("a", namespace, href=rel(chrome.here, jobs_path(namespace)))),
        ("uid", el("code", summary.get("uid"))),
        ("pipeline", summary.get("pipeline")),
        ("phase", el("span", phase, class_=f"phase {phase}", id="phase")),
        ("created", when(summary.get("created"))),
        ("started", when(status.get("startTime"))),
        ("completed", when(status.get("completionTime"))),
    ]
    conditions = [
        el(
            "tr",
            el("td", c.get("type")),
            el("td", c.get("status")),
            el("td", c.get("reason")),
            el("td", c.get("message")),
        )
        for c in status.get("conditions") or []
    ]
    counts = {"total": status.get("total"), "processed": status.get("processed")}
    export = api_path(namespace, name, "/results")
    shown = f"reason {view.reason}" if view.reason else "all reasons"
    return page(
        chrome,
        f"{name} ({namespace})",
        el("h1", "MLJob ", el("code", name)),
        el("dl", *(el("div", el("dt", k), el("dd", v)) for k, v in facts), class_="facts"),
        el(
            "p",
            _progress(counts),
            " ",
            el(
                "span",
                f"{status.get('progress') or NONE}: {number(status.get('processed'))} of "
                f"{number(status.get('total'))} processed, {number(status.get('failed'))} failed",
                id="progress-text",
            ),
            class_="progress",
        ),
        el("p", f"This page reloads every {REFRESH_SECONDS} s while the job runs.", class_="hint")
        if phase not in TERMINAL
        else None,
        el(
            "table",
            el("thead", el("tr", *(el("th", h) for h in ("condition", "status", "reason", "message")))),
            el("tbody", conditions),
            id="conditions",
        )
        if conditions
        else None,
        el("h2", "Counts"),
        _counts(summary),
        _stores_note(summary),
        el("h2", "Throughput"),
        _chart(chrome, summary, throughput),
        el("h2", "Failed items by reason"),
        _reasons(chrome, summary, view, limit_default),
        el("h2", f"Failed items ({shown})"),
        _failed_table(failed, view, limit_default),
        el("h2", "Results"),
        el(
            "p",
            "Every result, streamed: ",
            el("a", "JSON lines", href=rel(chrome.here, export + "?format=jsonl"), id="export-jsonl"),
            " · ",
            el("a", "CSV", href=rel(chrome.here, export + "?format=csv"), id="export-csv"),
        ),
        refresh=REFRESH_SECONDS if phase not in TERMINAL else None,
    )
