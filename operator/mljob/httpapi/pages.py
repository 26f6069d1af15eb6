"""The job pages: a namespace's MLJobs and one job's page, server-rendered HTML (`render`).

    GET  /ui/                                    log in, or (signed in) pick a namespace
    POST /ui/login                               a token from the form -> an HttpOnly cookie
    POST /ui/logout                              the cookie removed
    GET  /ui/namespaces/{ns}/mljobs              the namespace's MLJobs (`list`)
    GET  /ui/namespaces/{ns}/mljobs/{name}       a job's page (`get`): ?reason=&limit=&after=
    GET  /ui/static/{page.js,page.css}           the one script and stylesheet

Same rules as the JSON routes, through the same reads (`routes.read_job`, `summary`,
`routes.read_items`, `routes.read_throughput`, `routes.read_jobs`): the token is reviewed by the
apiserver on every page, RBAC decides, and the stores are asked by the MLJob's UID. A browser
cannot add a header, so the login form posts the token once and the answer sets it as a cookie
(HttpOnly: no script reads it; SameSite=Strict: no other site's page sends it; Secure when the
page came over TLS), which `auth.bearer_token` reads after the headers; the results export and
the throughput JSON the page links to are then allowed the same way. A page asked for without a
valid token is the login form (401) that comes back to it; without the right, a 403 page.

The token is never logged and never in a URL (the form posts it). The login refuses a form
another site posted (`Sec-Fetch-Site`). Every page carries a Content-Security-Policy that lets
only this API's own script and stylesheet run (no inline script, no other origin), on top of
`render` escaping everything from the stores.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from mljob.httpapi import ledger, params, render, routes
from mljob.httpapi.auth import COOKIE, ReviewUnavailable, Unauthenticated, bearer_token
from mljob.httpapi.summary import summary

#: Failed items per page of the job page's table, unless `limit` says otherwise (at most
#: params.MAX_ITEMS_LIMIT).
PAGE_ITEMS = 50
#: A cookie holds about 4 KB: a longer token (an OIDC id-token with many groups) cannot be kept.
MAX_TOKEN_LENGTH = 4000
STATIC_FILES = {"page.js": "text/javascript", "page.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
#: What a token may hold: the characters of a JWT and of the usual static tokens, no space.
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=:-]+$")
_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8", headers=HEADERS)


def _here(request: web.Request) -> str:
    """The page's own path as the browser sent it (still percent-encoded): links are relative to it."""
    return request.rel_url.raw_path


def _see_other(chrome: render.Chrome, target: str) -> web.Response:
    """303 to `target` (a path of this API), by a relative Location: right behind a proxy too."""
    return web.Response(status=303, headers={**HEADERS, "Location": render.rel(chrome.here, target)})


async def _signed_in(request: web.Request) -> str | None:
    """The user's name when the request carries a token the apiserver accepts, else None."""
    if bearer_token(request.headers, request.cookies) is None:
        return None
    try:
        return (await routes.caller(request)).name
    except routes.ApiError:
        return None


def _page(handler: Callable[[web.Request, render.Chrome], Awaitable[web.StreamResponse]]) -> Handler:
    """A page handler: its ApiError (401, 403, 404, 400, 503) as a page, the 401 as the login
    form that comes back here."""

    async def answer(request: web.Request) -> web.StreamResponse:
        chrome = render.Chrome(here=_here(request))
        try:
            return await handler(request, chrome)
        except routes.ApiError as err:
            next_path = request.rel_url.raw_path_qs
            if err.code == 401:
                sent = bearer_token(request.headers, request.cookies) is not None
                message = str(err) if sent else "log in with a Kubernetes token to see this page"
                return _html(render.login_page(chrome, message=message, next_path=next_path), 401)
            user = await _signed_in(request) if err.code != 503 else None
            body = render.error_page(render.Chrome(chrome.here, user), err.code, str(err), next_path)
            return _html(body, err.code)

    return answer


def _only(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        query = params.single(request.query.items())
        unknown = sorted(set(query) - set(allowed))
        if unknown:
            raise params.ParamError(
                f"unknown parameter {', '.join(unknown)}: this page takes {', '.join(allowed)}"
            )
    except params.ParamError as err:
        raise routes.ApiError(400, str(err)) from None
    return query


async def start(request: web.Request) -> web.StreamResponse:
    """The login form, or for a signed-in user a namespace form (`?namespace=` goes there)."""
    chrome = render.Chrome(here=_here(request))
    namespace = request.query.get("namespace", "").strip()
    user = await _signed_in(request)
    if user is None:
        return _html(render.login_page(chrome, namespace=namespace), 200)
    if namespace:
        if not _NAMESPACE.match(namespace):
            return _html(render.start_page(render.Chrome(chrome.here, user), namespace), 400)
        return _see_other(chrome, render.jobs_path(namespace))
    return _html(render.start_page(render.Chrome(chrome.here, user)))


def _safe_next(value: str) -> str | None:
    """A page of this UI to go back to after the login, or None (never another site)."""
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not value.startswith(render.UI + "/") or "//" in value:
        return None
    if not _PATH.match(parts.path) or "/../" in parts.path + "/" or "\\" in value:
        return None
    return value


async def login_form(request: web.Request) -> web.StreamResponse:
    """The login form, always (also to change tokens); `?next=` is where it goes afterwards."""
    chrome = render.Chrome(here=_here(request))
    next_path = _safe_next(request.query.get("next", ""))
    return _html(render.login_page(chrome, next_path=next_path, namespace=request.query.get("namespace", "")))


async def login(request: web.Request) -> web.StreamResponse:
    """The form's token, checked by a TokenReview, kept in the cookie; then back to the page the
    user came for (`next`), the namespace's list, or the start page."""
    chrome = render.Chrome(here=_here(request))
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return _html(render.error_page(chrome, 403, "the login form must be sent from this site"), 403)
    form = await request.post()
    token = str(form.get("token") or "").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    namespace = str(form.get("namespace") or "").strip()
    next_path = _safe_next(str(form.get("next") or ""))

    def again(message: str, status: int) -> web.Response:
        body = render.login_page(chrome, message=message, next_path=next_path, namespace=namespace)
        return _html(body, status)

    if not token:
        return again("no token: paste one, e.g. from `kubectl -n NAMESPACE create token ACCOUNT`", 400)
    if len(token) > MAX_TOKEN_LENGTH or not _TOKEN.match(token):
        return again(
            f"not a token this page can keep: at most {MAX_TOKEN_LENGTH} characters, no spaces "
            "(a longer one works with the JSON API's Authorization header)",
            400,
        )
    if namespace and not _NAMESPACE.match(namespace):
        return again(f"namespace: a Kubernetes namespace name expected, got {namespace!r}", 400)
    reviewer = request.app[routes.STATE].reviewer
    try:
        user = await reviewer.user(token)
    except Unauthenticated as err:
        return again(str(err), 401)
    except ReviewUnavailable as err:
        return again(str(err), 503)
    routes.noted(user)
    target = next_path or (render.jobs_path(namespace) if namespace else render.START)
    response = _see_other(chrome, target)
    base = str(form.get("base") or "")
    response.set_cookie(
        COOKIE,
        token,
        path=base if _PATH.match(base) and base.endswith("/") and ";" not in base else "/",
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
    )
    return response


def _secure(request: web.Request) -> bool:
    """The page came over TLS: to this process, or to a proxy in front that says so."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


async def logout(request: web.Request) -> web.StreamResponse:
    chrome = render.Chrome(here=_here(request))
    response = _see_other(chrome, render.START)
    base = str((await request.post()).get("base") or "/")
    # One Set-Cookie per path the cookie may have been set on (aiohttp's cookie jar keeps one per name).
    for path in sorted({"/", base}):
        if _PATH.match(path) and path.endswith("/") and ";" not in path:
            response.headers.add(
                "Set-Cookie",
                f'{COOKIE}=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path={path}; '
                "HttpOnly; SameSite=Strict",
            )
    return response


@_page
async def jobs(request: web.Request, chrome: render.Chrome) -> web.StreamResponse:
    namespace = request.match_info["ns"]
    try:
        query = params.jobs_query(_only(request, ("continue",)))
    except params.ParamError as err:
        raise routes.ApiError(400, str(err)) from None
    listing = await routes.read_jobs(request, query)  # 401, 403 first
    user = routes.noted_user()
    return _html(render.jobs_page(render.Chrome(chrome.here, user), namespace, listing))


@_page
async def job(request: web.Request, chrome: render.Chrome) -> web.StreamResponse:
    body = await routes.read_job(request)
    query = _only(request, ("reason", "limit", "after"))
    try:
        items = params.items_query({"limit": str(PAGE_ITEMS), **query, "outcome": "failed"}, ledger.REASONS)
    except params.ParamError as err:
        raise routes.ApiError(400, str(err)) from None
    stores = routes.stores_of(request)
    uid = str(body["metadata"]["uid"])

    async def chart() -> dict[str, Any] | None:
        try:
            return await routes.read_throughput(request, uid, None)
        except routes.ApiError:
            return None  # the chart says so; the rest of the page still answers

    answer, failed, throughput = await asyncio.gather(
        summary(stores, body), routes.read_items(request, uid, items), chart()
    )
    view = render.FailedView(reason=items.reason, limit=items.limit, after=query.get("after"))
    user = routes.noted_user()
    page = render.job_page(render.Chrome(chrome.here, user), answer, failed, throughput, view, PAGE_ITEMS)
    return _html(page)


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    kind = STATIC_FILES.get(name)
    if kind is None:
        raise routes.ApiError(404, f"no static file {name!r}")
    text = (resources.files("mljob.httpapi") / "static" / name).read_text(encoding="utf-8")
    headers = {"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"}
    return web.Response(text=text, content_type=kind, charset="utf-8", headers=headers)


async def to_start(request: web.Request) -> web.StreamResponse:
    return web.Response(status=303, headers={**HEADERS, "Location": "ui/"})


def add_routes(app: web.Application) -> None:
    app.router.add_get(render.UI, to_start)
    app.router.add_get(render.START, start)
    app.router.add_post(render.LOGIN, login)
    app.router.add_get(render.LOGIN, login_form)
    app.router.add_post(render.LOGOUT, logout)
    app.router.add_get(render.STATIC + "/{file}", static)
    app.router.add_get(render.UI + "/namespaces/{ns}/mljobs", jobs)
    app.router.add_get(render.UI + "/namespaces/{ns}/mljobs/{name}", job)
