"""The query parameters of the read-only API: parsed, or refused with a message saying what to fix.

Pure (no I/O), so every rule is a table test. A refusal is a `ParamError`, which the routes turn
into a 400 whose `error` is its message. Paging is keyset paging on the item id: the cursor
(`after`) is the last id of the page before, base64url-encoded so that any id travels safely in
a URL; it is opaque to clients (they pass back the `next` a page gave them).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from mljob.api.models import MAX_ITEM_ID_LENGTH

Outcome = Literal["succeeded", "failed", "pending"]
OUTCOMES: tuple[Outcome, ...] = ("succeeded", "failed", "pending")
#: Items per page when `limit` is not given, and the most one page may ask for.
DEFAULT_ITEMS_LIMIT = 100
MAX_ITEMS_LIMIT = 1000
#: MLJobs per page of the namespace listing (`limit`), by default and at most.
DEFAULT_JOBS_LIMIT = 500
MAX_JOBS_LIMIT = 1000
ExportFormat = Literal["jsonl", "csv"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("jsonl", "csv")
#: Throughput: at most this many buckets between a job's start and its end (or now); without
#: `bucket`, the width is the smallest of `NICE_BUCKETS` that gives at most `AUTO_BUCKETS`.
MAX_BUCKETS = 1000
AUTO_BUCKETS = 120
NICE_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
#: The widest bucket one may ask for (a week).
MAX_BUCKET_SECONDS = 7 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600}
#: The longest cursor `encode_cursor` makes (a UTF-8 id of MAX_ITEM_ID_LENGTH characters).
_MAX_CURSOR = (MAX_ITEM_ID_LENGTH * 4 * 4) // 3 + 4


class ParamError(ValueError):
    """A query parameter the API cannot use; the message names it and what it accepts."""


@dataclass(frozen=True)
class ItemsQuery:
    """`GET .../items`: which items (None: every outcome), from where, how many."""

    outcome: Outcome | None
    reason: str | None
    limit: int
    after: str | None


@dataclass(frozen=True)
class JobsQuery:
    """`GET .../mljobs`: one page of the namespace's MLJobs (`continue` is the apiserver's token)."""

    limit: int
    continue_token: str | None


def encode_cursor(item_id: str) -> str:
    """The `next` of a page that ended at `item_id`."""
    return base64.urlsafe_b64encode(item_id.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> str:
    """The item id a cursor stands for; ParamError for anything `encode_cursor` did not make."""
    problem = "after: not a cursor this API returned (pass the `next` of the page before, unchanged)"
    if not cursor or len(cursor) > _MAX_CURSOR:
        raise ParamError(problem)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        item_id = raw.decode()
    except (binascii.Error, ValueError):
        raise ParamError(problem) from None
    if not item_id or len(item_id) > MAX_ITEM_ID_LENGTH or encode_cursor(item_id) != cursor:
        raise ParamError(problem)
    return item_id


def single(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The query string as a mapping; a parameter given twice is refused (which one was meant?)."""
    query: dict[str, str] = {}
    for name, value in pairs:
        if name in query:
            raise ParamError(f"{name}: given more than once; pass it once")
        query[name] = value
    return query


def _only(query: Mapping[str, str], allowed: Collection[str]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ParamError(
            f"unknown parameter {', '.join(unknown)}: this endpoint takes {', '.join(sorted(allowed))}"
        )


def _limit(text: str | None, default: int, maximum: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ParamError(f"limit: a whole number from 1 to {maximum} expected, got {text!r}") from None
    if not 1 <= value <= maximum:
        raise ParamError(f"limit: a whole number from 1 to {maximum} expected, got {value}")
    return value


def items_query(query: Mapping[str, str], reasons: Collection[str]) -> ItemsQuery:
    """`outcome`, `reason` (of failed items, one of `reasons`), `limit`, `after`."""
    _only(query, ("outcome", "reason", "limit", "after"))
    outcome = query.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise ParamError(f"outcome: one of {', '.join(OUTCOMES)} expected, got {outcome!r}")
    reason = query.get("reason")
    if reason is not None:
        if reason not in reasons:
            raise ParamError(f"reason: one of {', '.join(sorted(reasons))} expected, got {reason!r}")
        if outcome not in (None, "failed"):
            raise ParamError(
                f"reason: only failed items have one; drop it or use outcome=failed, not {outcome}"
            )
        outcome = "failed"
    after = query.get("after")
    return ItemsQuery(
        outcome=outcome,  # type: ignore[arg-type]  # checked against OUTCOMES above
        reason=reason,
        limit=_limit(query.get("limit"), DEFAULT_ITEMS_LIMIT, MAX_ITEMS_LIMIT),
        after=decode_cursor(after) if after is not None else None,
    )


def jobs_query(query: Mapping[str, str]) -> JobsQuery:
    """`limit` and `continue` (the `next` of the page before)."""
    _only(query, ("limit", "continue"))
    token = query.get("continue")
    if token is not None and not token:
        raise ParamError("continue: pass the `next` of the page before, or leave it out")
    return JobsQuery(_limit(query.get("limit"), DEFAULT_JOBS_LIMIT, MAX_JOBS_LIMIT), token)


def export_format(query: Mapping[str, str]) -> ExportFormat:
    """`format` of the results export: jsonl (the default) or csv."""
    _only(query, ("format",))
    fmt = query.get("format", "jsonl")
    if fmt not in EXPORT_FORMATS:
        raise ParamError(f"format: one of {', '.join(EXPORT_FORMATS)} expected, got {fmt!r}")
    return fmt  # type: ignore[return-value]  # checked against EXPORT_FORMATS above


def throughput_bucket(query: Mapping[str, str]) -> int | None:
    """`bucket` of the throughput: seconds, as `30`, `30s`, `5m` or `1h` (None: chosen from the
    job's duration)."""
    _only(query, ("bucket",))
    text = query.get("bucket")
    if text is None:
        return None
    problem = f"bucket: seconds expected (e.g. 10s, 5m, 1h), from 1s to {MAX_BUCKET_SECONDS // 86400} days"
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    if not number.isdigit():
        raise ParamError(f"{problem}, got {text!r}")
    seconds = int(number) * _UNITS[unit]
    if not 1 <= seconds <= MAX_BUCKET_SECONDS:
        raise ParamError(f"{problem}, got {text!r}")
    return seconds


def bucket_width(span_seconds: float, asked: int | None) -> int:
    """The bucket width for a job that has run `span_seconds`: `asked` when that gives at most
    `MAX_BUCKETS` buckets, else (and without `asked`) the smallest nice width that gives at most
    `MAX_BUCKETS` (`AUTO_BUCKETS` without `asked`); whole days past the nice widths."""
    limit = MAX_BUCKETS if asked is not None else AUTO_BUCKETS
    least = max(span_seconds, 0.0) / limit
    if asked is not None and asked >= least:
        return asked
    for width in NICE_BUCKETS:
        if width >= least and (asked is None or width >= asked):
            return width
    days = -(-int(least) // 86400) or 1
    return max(days * 86400, asked or 0)
