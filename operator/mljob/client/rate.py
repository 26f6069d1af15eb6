"""Progress rate and ETA: from the API's throughput (results per bucket, counted by Postgres), or
from samples of a job's processed count. Pure but for `SampleLog`.

A sample is (seconds, processed). The rate over the last `window` seconds is the count gained
from the oldest sample in that window to now, where "now" carries the latest count known: a job
that stopped moving decays to 0 within the window instead of keeping its last speed. When no
sample is older than a second, there is no rate (None), and so no ETA.

`mljob status` takes the rate from the API's throughput (`from_throughput`). An API without it
(or one that cannot read Postgres) leaves samples: `SampleLog` keeps a job's between two runs of
`mljob status` in the user's cache (`$XDG_CACHE_HOME/mljob/samples/<uid>.json`), so a second look
a while later has a rate over the last minute; with none yet, the average since the job started.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

Sample = tuple[float, int]
WINDOW_SECONDS = 60.0
#: Samples older than this are dropped from a log.
KEEP_SECONDS = 300.0


@dataclass(frozen=True)
class Rate:
    """Items per second over `seconds` (how long the samples actually span); `since_start`
    when it is the average over the whole run instead of a recent window."""

    per_second: float
    seconds: float
    since_start: bool = False

    def describe(self) -> str:
        span = "since start" if self.since_start else f"over the last {self.seconds:.0f}s"
        return f"{format_rate(self.per_second)} {span}"


def format_rate(per_second: float) -> str:
    if per_second >= 10:
        return f"{per_second:,.0f}/s"
    if per_second >= 0.1:
        return f"{per_second:.1f}/s"
    if per_second > 0:
        return f"{per_second * 60:.1f}/min"
    return "0/s"


def rate(samples: Sequence[Sample], now: float, window: float = WINDOW_SECONDS) -> Rate | None:
    """Items per second over the last `window` seconds up to `now` (None: too few samples)."""
    if not samples:
        return None
    ordered = sorted(s for s in samples if s[0] <= now)
    if not ordered:
        return None
    latest = ordered[-1][1]
    inside = [s for s in ordered if s[0] >= now - window]
    before = [s for s in ordered if s[0] < now - window]
    if inside and now - inside[0][0] >= 1.0:
        first = inside[0]
    elif before:
        # Too little inside the window: from the last sample before it (a longer span, said so).
        first = before[-1]
    else:
        return None
    span = now - first[0]
    if span < 1.0:
        return None
    return Rate(max(latest - first[1], 0) / span, span)


def from_throughput(
    points: Sequence[Mapping[str, Any]], end: str | None, window: float = WINDOW_SECONDS
) -> Rate | None:
    """Items per second over the last `window` seconds up to `end`, from the API's throughput:
    results recorded per bucket (`start`, `succeeded`, `failed`), counted by Postgres. The
    trailing buckets are taken until they cover the window (the last one runs to `end`), so a
    bucket wider than the window still gives a rate, over its longer span (None: no points)."""
    until = parse_time(end)
    if until is None or not points:
        return None
    count, begun = 0, until
    for point in reversed(points):
        start = parse_time(point.get("start"))
        if start is None:
            return None
        begun = start
        count += int(point.get("succeeded") or 0) + int(point.get("failed") or 0)
        if until - begun >= window:
            break
    span = until - begun
    return Rate(count / span, span) if span >= 1.0 else None


def average_since(start: str | None, processed: int, now: float) -> Rate | None:
    """The average rate since `start` (an RFC 3339 time, the job's startTime)."""
    begun = parse_time(start)
    if begun is None or now - begun < 1.0:
        return None
    return Rate(processed / (now - begun), now - begun, since_start=True)


def eta(remaining: int, current: Rate | None) -> float | None:
    """Seconds until `remaining` items are done at `current` (None: unknown; 0: nothing left)."""
    if remaining <= 0:
        return 0.0
    if current is None or current.per_second <= 0:
        return None
    return remaining / current.per_second


def format_duration(seconds: float | None) -> str:
    """`8s`, `4m05s`, `2h03m`, `3d4h`; `-` for unknown."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def parse_time(text: str | None) -> float | None:
    """An RFC 3339 time (as Kubernetes writes them) in epoch seconds, or None."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def add(samples: Sequence[Sample], sample: Sample, keep: float = KEEP_SECONDS) -> list[Sample]:
    """`samples` with `sample` added and those older than `keep` before it dropped."""
    kept = [s for s in samples if sample[0] - keep <= s[0] < sample[0]]
    return [*kept, sample]


class SampleLog:
    """A job's samples in the user's cache, shared by successive `mljob status` runs."""

    def __init__(self, uid: str, directory: Path | None = None) -> None:
        base = (
            directory
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mljob" / "samples"
        )
        self.path = base / f"{uid}.json"

    def read(self) -> list[Sample]:
        try:
            raw = json.loads(self.path.read_text())
            return [(float(t), int(n)) for t, n in raw]
        except (OSError, ValueError, TypeError):
            return []

    def record(self, processed: int, now: float | None = None) -> list[Sample]:
        """The log with this sample added (written back; a cache that cannot be written is skipped)."""
        samples = add(self.read(), (time.time() if now is None else now, processed))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(samples))
            tmp.replace(self.path)
        except OSError:
            pass
        return samples
