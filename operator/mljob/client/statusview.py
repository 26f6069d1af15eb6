"""`mljob status NAME`: one screen of a job from the read-only API's summary. Pure.

Phase and conditions, the counts with the rate and ETA, then the four stores side by side (the
MLJob status, the Postgres ledger, the Redis state, the NATS consumer), then each disagreement
the API found, with what the runbook says about it (`runbook.entry_for`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mljob.client.rate import Rate, format_duration, parse_time
from mljob.client.runbook import ROW_3, entry_for
from mljob.client.tables import cell, table, truncate

TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled"})
MESSAGE_WIDTH = 72


def ago(moment: str | None, now: float) -> str:
    at = parse_time(moment)
    return "-" if at is None else f"{format_duration(max(now - at, 0))} ago"


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def counts(summary: Mapping[str, Any]) -> tuple[int, int, int]:
    """(total, processed, failed) as the MLJob status has them."""
    status = summary.get("status") or {}
    return _int(status.get("total")), _int(status.get("processed")), _int(status.get("failed"))


def progress_line(summary: Mapping[str, Any]) -> str:
    total, processed, failed = counts(summary)
    if total <= 0:
        return "no items counted yet"
    percent = min(processed, total) * 100 // total
    return (
        f"{percent}%  {processed:,} of {total:,} processed ({failed:,} failed), "
        f"{max(total - processed, 0):,} pending"
    )


def _stores(summary: Mapping[str, Any], now: float) -> list[str]:
    status = summary.get("status") or {}
    pg, rd, nt = summary.get("postgres"), summary.get("redis"), summary.get("nats")
    total, processed, failed = counts(summary)
    columns: list[list[Any]] = []

    columns.append(
        [
            status.get("phase") or "Pending",
            total if status.get("total") is not None else None,
            processed,
            failed,
            _int(status.get("pending")) if status.get("pending") is not None else max(total - processed, 0),
            None,
            None,
            ago(status.get("lastActivityTime"), now),
        ]
    )
    if pg is None:
        columns.append(["(unread)", *([None] * 7)])
    else:
        job, outcomes = pg.get("job"), pg.get("outcomes") or {}
        columns.append(
            [
                (job or {}).get("phase") or "no row",
                pg.get("items"),
                _int(outcomes.get("succeeded")) + _int(outcomes.get("failed")),
                outcomes.get("failed"),
                outcomes.get("pending"),
                None,
                None,
                ago((job or {}).get("lastActivityTime"), now),
            ]
        )
    if rd is None:
        columns.append(["(unread)", *([None] * 7)])
    elif not rd.get("present"):
        columns.append(["no state", *([None] * 7)])
    else:
        columns.append(
            [
                "present",
                rd.get("total"),
                rd.get("processed"),
                rd.get("failed"),
                rd.get("pending"),
                None,
                None,
                ago(rd.get("lastActivity"), now),
            ]
        )
    if nt is None:
        columns.append(["(unread)", *([None] * 7)])
    elif not nt.get("present"):
        columns.append(["no consumer", *([None] * 7)])
    else:
        columns.append(
            [
                "present",
                None,
                None,
                None,
                nt.get("numPending"),
                nt.get("numAckPending"),
                nt.get("numRedelivered"),
                None,
            ]
        )
    labels = [
        "phase",
        "items",
        "processed",
        "failed",
        "pending",
        "ack pending",
        "redelivered",
        "last activity",
    ]
    rows = [[label, *(column[index] for column in columns)] for index, label in enumerate(labels)]
    lines = table(["", "MLJob", "Postgres", "Redis", "NATS consumer"], rows, upper=False)
    return ["  " + line for line in lines]


def render(
    summary: Mapping[str, Any],
    current: Rate | None,
    eta_seconds: float | None,
    now: float,
    wide: bool = False,
) -> list[str]:
    """The status screen's lines."""
    status = summary.get("status") or {}
    phase = status.get("phase") or "Pending"
    limit = None if wide else MESSAGE_WIDTH
    out = [
        f"Name:        {summary.get('namespace')}/{summary.get('name')}",
        f"UID:         {summary.get('uid')}",
        f"Pipeline:    {summary.get('pipeline')}",
        f"Phase:       {phase}",
        f"Progress:    {progress_line(summary)}",
    ]
    if phase in TERMINAL:
        started, finished = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
        took = format_duration(finished - started) if started is not None and finished is not None else "-"
        out.append(f"Finished:    {ago(status.get('completionTime'), now)} (ran {took})")
    else:
        rate_text = current.describe() if current is not None else "- (no samples yet)"
        out.append(f"Rate:        {rate_text}")
        out.append(f"ETA:         {format_duration(eta_seconds)}")
        out.append(f"Started:     {ago(status.get('startTime'), now)}")
    out.append(f"Created:     {ago(summary.get('created'), now)}")

    conditions = status.get("conditions") or []
    if conditions:
        out.append("Conditions:")
        rows = [
            [
                c.get("type"),
                c.get("status"),
                c.get("reason"),
                ago(c.get("lastTransitionTime"), now),
                c.get("message"),
            ]
            for c in conditions
        ]
        out += [
            "  " + line
            for line in table(["type", "status", "reason", "age", "message"], rows, {"message": limit})
        ]

    out.append("Stores:")
    out += _stores(summary, now)
    pg = summary.get("postgres") or {}
    by_reason = pg.get("failedByReason") or {}
    if by_reason:
        out.append(
            "Failed by reason (Postgres): " + ", ".join(f"{r} {cell(n)}" for r, n in by_reason.items())
        )
    nats = summary.get("nats") or {}
    if wide and nats.get("present"):
        out.append(f"  NATS ack pending is not what the operator decides from: {ROW_3.cite()}")

    disagreements = summary.get("disagreements") or []
    if not disagreements:
        unread = sorted((summary.get("errors") or {}).keys())
        out.append(
            "Disagreements: none"
            + (f" among the stores read (not read: {', '.join(unread)})" if unread else "")
        )
    else:
        out.append("Disagreements:")
        for sentence in disagreements:
            entry = entry_for(str(sentence))
            out.append(f"  - {sentence}")
            out.append(f"    runbook: {entry.cite()}")
            out.append(f"    it says: {entry.says}")
    errors = summary.get("errors") or {}
    if errors:
        out.append("Not read:")
        out += [f"  {store}: {why}" for store, why in errors.items()]
    diagnostics = status.get("diagnostics") or []
    if wide and diagnostics:
        out.append("Diagnostics:")
        rows = [
            [ago(d.get("time"), now), d.get("reason"), truncate(str(d.get("message") or ""), limit)]
            for d in diagnostics
        ]
        out += ["  " + line for line in table(["age", "reason", "message"], rows)]
    return out


def as_data(summary: Mapping[str, Any], current: Rate | None, eta_seconds: float | None) -> dict[str, Any]:
    """`-o json|yaml`: the API's summary, with the rate and ETA and each disagreement's runbook entry."""
    data = dict(summary)
    data["rate"] = (
        None
        if current is None
        else {
            "perSecond": round(current.per_second, 3),
            "overSeconds": round(current.seconds, 1),
            "sinceStart": current.since_start,
        }
    )
    data["etaSeconds"] = None if eta_seconds is None else round(eta_seconds, 1)
    data["runbook"] = [
        {"disagreement": s, "section": entry_for(str(s)).heading, "says": entry_for(str(s)).says}
        for s in summary.get("disagreements") or []
    ]
    return data
