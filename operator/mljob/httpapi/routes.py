"""The HTTP routes of the read-only API (aiohttp), kubectl-like paths, JSON answers.

    GET /healthz                                          the process answers
    GET /readyz                                           connected, and Postgres answers
    GET /api/v1/namespaces/{ns}/mljobs                    the namespace's MLJobs (`list`)
    GET /api/v1/namespaces/{ns}/mljobs/{name}             a job's summary (`get`, as all below)
    GET /api/v1/namespaces/{ns}/mljobs/{name}/items       its items, a page at a time
    GET /api/v1/namespaces/{ns}/mljobs/{name}/results     its results, streamed (jsonl or csv)
    GET /api/v1/namespaces/{ns}/mljobs/{name}/throughput  results recorded per time bucket
    GET /ui/...                                           the job pages (`pages`), same rules

Every request under /api is authenticated (401 with `WWW-Authenticate: Bearer`) and authorised
(403) by the apiserver before anything is read (`auth.Reviewer`), so a caller without the right
cannot even learn whether a job exists; then the MLJob is read (404 when there is none) and its
UID is what every store is asked about. Errors are `{"error": "<what to fix>", "code": N}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from mljob.adapters.outage import one_line
from mljob.httpapi import ledger, params
from mljob.httpapi.auth import Forbidden, Reviewer, ReviewUnavailable, Unauthenticated, User, bearer_token
from mljob.httpapi.summary import Stores, job_entry, summary

log = logging.getLogger("mljob.api")

#: How long reading an MLJob (or a page of them) from the apiserver may take.
KUBE_TIMEOUT_SECONDS = 10.0
#: Exports streaming at once: each holds a Postgres connection for as long as it streams.
MAX_EXPORTS = 4
CONTENT_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
PROBES = frozenset({"/healthz", "/readyz"})


class Jobs(Protocol):
    """What the routes read MLJobs through (adapters.kube.Kube has both)."""

    async def get_job(
        self, namespace: str, name: str, timeout: float | None = None
    ) -> dict[str, Any] | None: ...

    async def list_jobs_page(
        self, namespace: str, limit: int, continue_token: str | None, timeout: float
    ) -> dict[str, Any]: ...


@dataclass
class ApiState:
    """What the routes serve from: the reviews and MLJobs from the start, the stores once
    connected (until then per-job reads answer 503)."""

    reviewer: Reviewer
    kube: Jobs
    stores: Stores | None = None
    ready: Callable[[], Awaitable[str | None]] | None = None
    exports: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_EXPORTS))


class ApiError(Exception):
    """An answer other than 200, with the message for the caller."""

    def __init__(self, code: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.headers = dict(headers or {})


def _error(err: ApiError) -> web.Response:
    return web.json_response({"error": str(err), "code": err.code}, status=err.code, headers=err.headers)


STATE: web.AppKey[ApiState] = web.AppKey("state", ApiState)


@dataclass
class _Seen:
    """What a request's middleware learns from its handler (a request runs in one task)."""

    user: User | None = None
    #: set once a streamed answer has begun: an error can no longer become a status
    streaming: bool = False


_SEEN: ContextVar[_Seen] = ContextVar("mljob_api_request")


def noted(user: User) -> None:
    """Name `user` in the request's log line (the pages' login reviews a token itself)."""
    _SEEN.get().user = user


def noted_user() -> str | None:
    """The name of the user the request was reviewed as, if it was."""
    user = _SEEN.get().user
    return user.name if user is not None else None


@web.middleware
async def _answers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refusals as JSON with their status; one log line per request naming the user, never a token."""
    started = time.monotonic()
    seen = _Seen()
    _SEEN.set(seen)
    try:
        response = await handler(request)
    except ApiError as err:
        response = _error(err)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        response = _error(ApiError(err.status, err.reason))
    except Exception:
        if seen.streaming:
            raise
        log.exception("%s %s failed", request.method, request.path)
        response = _error(ApiError(500, "internal error: the API's log has the details"))
    user = seen.user
    # Probes come every few seconds and name nobody: a line only when they fail.
    quiet = request.path in PROBES and response.status < 400
    log.log(
        logging.DEBUG if quiet else logging.INFO,
        "%s %s %d %s %.0fms",
        request.method,
        request.path,
        response.status,
        user.name if user is not None else "-",
        (time.monotonic() - started) * 1000,
    )
    return response


async def _caller(request: web.Request) -> tuple[str, User]:
    """The caller's token and who it is (401 otherwise)."""
    state = request.app[STATE]
    token = bearer_token(request.headers, request.cookies)
    try:
        user = await state.reviewer.user(token)
    except Unauthenticated as err:
        challenge = 'Bearer realm="mljob"' + (', error="invalid_token"' if token is not None else "")
        raise ApiError(401, str(err), {"WWW-Authenticate": challenge}) from None
    except ReviewUnavailable as err:
        raise ApiError(503, str(err)) from None
    _SEEN.get().user = user
    assert token is not None
    return token, user


async def caller(request: web.Request) -> User:
    """Who is asking (ApiError 401 or 503 otherwise)."""
    return (await _caller(request))[1]


async def authorise(request: web.Request, verb: str, namespace: str, name: str | None) -> None:
    """ApiError 401, 403 or 503 unless the caller may `verb` MLJobs there (the one named `name`)."""
    token, user = await _caller(request)
    try:
        await request.app[STATE].reviewer.require(token, user, verb, namespace, name)
    except Forbidden as err:
        raise ApiError(403, str(err)) from None
    except ReviewUnavailable as err:
        raise ApiError(503, str(err)) from None


async def read_job(request: web.Request) -> dict[str, Any]:
    """The MLJob of the path, once the caller may `get` it (401, 403, then 404)."""
    namespace, name = request.match_info["ns"], request.match_info["name"]
    await authorise(request, "get", namespace, name)
    try:
        body = await request.app[STATE].kube.get_job(namespace, name, timeout=KUBE_TIMEOUT_SECONDS)
    except Exception as err:
        raise _kube_error(err, namespace, "read the MLJob") from None
    if body is None:
        raise ApiError(404, f"no MLJob {name!r} in namespace {namespace!r}")
    return dict(body)


def _kube_error(err: Exception, namespace: str, what: str) -> ApiError:
    """The API's own read of MLJobs failed: a namespace its ServiceAccount may not read is not
    served here (404); anything else is the apiserver's trouble (503)."""
    status = getattr(err, "status", None)
    if status == 403:
        return ApiError(
            404,
            f"namespace {namespace!r} is not served by this API: its ServiceAccount may not read "
            "MLJobs there (the chart's watchNamespaces)",
        )
    cause = f"{status} {getattr(err, 'reason', '')}".strip() if status is not None else type(err).__name__
    return ApiError(503, f"cannot {what} from the Kubernetes API ({cause}); try again")


def stores_of(request: web.Request) -> Stores:
    stores = request.app[STATE].stores
    if stores is None:
        raise ApiError(503, "not connected to the stores yet; try again in a moment")
    return stores


def _query(request: web.Request) -> dict[str, str]:
    try:
        return params.single(request.query.items())
    except params.ParamError as err:
        raise ApiError(400, str(err)) from None


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready = request.app[STATE].ready
    problem = "not connected to the stores yet" if ready is None else await ready()
    if problem is None:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "error": problem}, status=503)


async def read_jobs(request: web.Request, query: params.JobsQuery) -> dict[str, Any]:
    """A page of the namespace's MLJobs, once the caller may `list` them: `{"items": [job_entry],
    "next": the apiserver's continue token or None}`."""
    await authorise(request, "list", request.match_info["ns"], None)
    return await _jobs_page(request, query)


async def _jobs_page(request: web.Request, query: params.JobsQuery) -> dict[str, Any]:
    namespace = request.match_info["ns"]
    try:
        page = await request.app[STATE].kube.list_jobs_page(
            namespace, query.limit, query.continue_token, KUBE_TIMEOUT_SECONDS
        )
    except Exception as err:
        status = getattr(err, "status", None)
        if status == 410:
            raise ApiError(400, "continue: that listing expired; start again without it") from None
        if status == 400 and query.continue_token is not None:
            raise ApiError(
                400, "continue: not a token this API returned; pass the `next` of the page before"
            ) from None
        raise _kube_error(err, namespace, "list MLJobs") from None
    return {
        "items": [job_entry(body) for body in page.get("items") or []],
        "next": (page.get("metadata") or {}).get("continue") or None,
    }


async def read_items(request: web.Request, uid: str, query: params.ItemsQuery) -> dict[str, Any]:
    """A page of the job's items (ledger.items_page), 503 when Postgres cannot be read."""
    pool = stores_of(request).pool
    try:
        return await ledger.items_page(pool, uid, query)
    except Exception as err:
        raise ApiError(503, f"cannot read the items from Postgres ({one_line(err)}); try again") from None


async def read_throughput(request: web.Request, uid: str, bucket: int | None) -> dict[str, Any]:
    """The job's results per time bucket (ledger.throughput), 503 when Postgres cannot be read."""
    pool = stores_of(request).pool
    try:
        return await ledger.throughput(pool, uid, bucket)
    except Exception as err:
        raise ApiError(
            503, f"cannot read the throughput from Postgres ({one_line(err)}); try again"
        ) from None


async def list_jobs(request: web.Request) -> web.Response:
    namespace = request.match_info["ns"]
    await authorise(request, "list", namespace, None)
    try:
        query = params.jobs_query(_query(request))
    except params.ParamError as err:
        raise ApiError(400, str(err)) from None
    return web.json_response(await _jobs_page(request, query))


async def get_summary(request: web.Request) -> web.Response:
    body = await read_job(request)
    return web.json_response(await summary(stores_of(request), body))


async def get_items(request: web.Request) -> web.Response:
    body = await read_job(request)
    try:
        query = params.items_query(_query(request), ledger.REASONS)
    except params.ParamError as err:
        raise ApiError(400, str(err)) from None
    return web.json_response(await read_items(request, str(body["metadata"]["uid"]), query))


async def get_throughput(request: web.Request) -> web.Response:
    body = await read_job(request)
    try:
        bucket = params.throughput_bucket(_query(request))
    except params.ParamError as err:
        raise ApiError(400, str(err)) from None
    return web.json_response(await read_throughput(request, str(body["metadata"]["uid"]), bucket))


async def get_results(request: web.Request) -> web.StreamResponse:
    """The job's results, streamed as they are read from a server-side cursor: constant memory
    whatever the job's size. A stream cut short (Postgres lost midway) ends the connection
    without the chunked encoding's last chunk, so a client sees a broken transfer, never a
    short file that looks whole."""
    body = await read_job(request)
    try:
        fmt = params.export_format(_query(request))
    except params.ParamError as err:
        raise ApiError(400, str(err)) from None
    stores = stores_of(request)
    state = request.app[STATE]
    namespace, name, uid = (
        body["metadata"]["namespace"],
        body["metadata"]["name"],
        str(body["metadata"]["uid"]),
    )
    if state.exports.locked():
        raise ApiError(
            429, f"{MAX_EXPORTS} exports are running; try again when one is done", {"Retry-After": "5"}
        )
    async with state.exports:
        try:
            async with (
                stores.pool.connection() as conn,
                contextlib.aclosing(ledger.export_rows(conn, uid)) as rows,
            ):
                batch = await anext(rows, None)
                response = web.StreamResponse(
                    headers={
                        "Content-Type": CONTENT_TYPES[fmt],
                        "Content-Disposition": f'attachment; filename="{namespace}-{name}-{uid}.{fmt}"',
                    }
                )
                response.enable_chunked_encoding()
                await response.prepare(request)
                _SEEN.get().streaming = True
                if fmt == "csv":
                    await response.write(ledger.csv_header())
                while batch is not None:
                    await response.write(ledger.encode_rows(batch, fmt))
                    batch = await anext(rows, None)
                await response.write_eof()
                return response
        except Exception as err:
            if _SEEN.get().streaming:
                log.warning("export of %s/%s (%s) cut short: %s", namespace, name, uid, one_line(err))
                raise
            raise ApiError(
                503, f"cannot read the results from Postgres ({one_line(err)}); try again"
            ) from None


def make_app(state: ApiState) -> web.Application:
    app = web.Application(middlewares=[_answers])
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    base = "/api/v1/namespaces/{ns}/mljobs"
    app.router.add_get(base, list_jobs)
    app.router.add_get(base + "/{name}", get_summary)
    app.router.add_get(base + "/{name}/items", get_items)
    app.router.add_get(base + "/{name}/results", get_results)
    app.router.add_get(base + "/{name}/throughput", get_throughput)
    from mljob.httpapi import pages  # it builds on this module's reads

    pages.add_routes(app)
    return app
