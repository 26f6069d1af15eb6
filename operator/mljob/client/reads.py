"""What the read-only API answers about a job: its summary, its items a page at a time (the
API's keyset cursor), and its results streamed as JSON lines or CSV.

Nothing here holds more than one page or one piece of the export: a job of a million items is
read with the memory of a page (`items`) or of a line (`results`).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from mljob.client.errors import ClientError, UsageError
from mljob.client.transport import ApiTransport, Target
from mljob.core.items import byte_lines

Outcome = Literal["succeeded", "failed", "pending"]
OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "pending")
#: Items per request, by default and at most (the API's own bounds: params.MAX_ITEMS_LIMIT).
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
ITEM_COLUMNS = ("id", "outcome", "reason", "error", "attempts", "worker", "finished")
RESULT_COLUMNS = (*ITEM_COLUMNS, "result")


@dataclass(frozen=True)
class Page:
    """One page of a job's items, and the cursor of the next (None: this was the last)."""

    uid: str
    items: list[dict[str, Any]]
    next: str | None


def job_path(namespace: str, name: str, suffix: str = "") -> str:
    quote = urllib.parse.quote
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/mljobs/{quote(name, safe='')}{suffix}"


def summary(api: ApiTransport, namespace: str, name: str) -> dict[str, Any]:
    """The job as every store sees it (README, "The read-only API")."""
    return api.get_json(job_path(namespace, name), {}, Target(namespace, name))


def page(
    api: ApiTransport,
    namespace: str,
    name: str,
    outcome: str | None = None,
    reason: str | None = None,
    limit: int = DEFAULT_PAGE_SIZE,
    after: str | None = None,
) -> Page:
    if outcome is not None and outcome not in OUTCOMES:
        raise UsageError(f"outcome: one of {', '.join(OUTCOMES)} expected, got {outcome!r}")
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise UsageError(f"page size: a whole number from 1 to {MAX_PAGE_SIZE} expected, got {limit}")
    query = {"outcome": outcome, "reason": reason, "limit": str(limit), "after": after}
    answer = api.get_json(job_path(namespace, name, "/items"), query, Target(namespace, name))
    items = answer.get("items")
    if not isinstance(items, list):
        raise ClientError(f"{api.where} answered a page without items: {str(answer)[:200]}")
    return Page(str(answer.get("uid") or ""), items, answer.get("next") or None)


def pages(
    api: ApiTransport,
    namespace: str,
    name: str,
    outcome: str | None = None,
    reason: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    after: str | None = None,
    limit: int | None = None,
) -> Iterator[Page]:
    """Every page from `after` on (the start when None), each fetched when the one before has
    been used, `limit` items at most in all (the last page asks only for what is left, so its
    `next` is where to go on from). Every page must be of one job (one UID): a job deleted and
    re-created while it is read would mix two jobs' items, and is refused instead."""
    uid = None
    fetched = 0
    while True:
        size = page_size if limit is None else min(page_size, limit - fetched)
        if size <= 0:
            return
        current = page(api, namespace, name, outcome, reason, size, after)
        if uid is not None and current.uid != uid:
            raise ClientError(
                f"MLJob {namespace}/{name} was re-created while its items were read "
                f"(uid {uid} became {current.uid}): start again"
            )
        uid = current.uid
        fetched += len(current.items)
        yield current
        if current.next is None:
            return
        after = current.next


def items(
    api: ApiTransport,
    namespace: str,
    name: str,
    outcome: str | None = None,
    reason: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> Iterator[dict[str, Any]]:
    """Every item of the job (of one outcome, or failed for one reason), in id order."""
    for current in pages(api, namespace, name, outcome, reason, page_size):
        yield from current.items


def throughput(api: ApiTransport, namespace: str, name: str, bucket: str = "5s") -> dict[str, Any]:
    """Results recorded per `bucket` from the job's start to now (or its end), counted by Postgres."""
    return api.get_json(job_path(namespace, name, "/throughput"), {"bucket": bucket}, Target(namespace, name))


ExportFormat = Literal["jsonl", "csv"]


def export(
    api: ApiTransport, namespace: str, name: str, fmt: ExportFormat = "jsonl"
) -> Generator[bytes, None, None]:
    """The job's results as the API streams them (pieces of any size)."""
    return api.stream(job_path(namespace, name, "/results"), {"format": fmt}, Target(namespace, name))


def results(api: ApiTransport, namespace: str, name: str) -> Iterator[dict[str, Any]]:
    """Every result of the job, one dict per item: id, outcome, reason, error, attempts, worker,
    finished and result (as the handler returned it)."""
    for line in byte_lines(export(api, namespace, name, "jsonl")):
        if line.strip():
            row: dict[str, Any] = json.loads(line)
            yield row
