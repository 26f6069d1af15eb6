"""The end of `make demo`: what Postgres recorded, how fast crashes were given up on, which
metrics moved, and proof that the job's stream, registry entry and Redis keys are gone.

Parsing and formatting are pure functions (unit-tested); `main` only gathers the inputs from the
stores, the operator's log and its `/metrics`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A failure the operator decided starts with its reason, e.g. "MaxDeliveriesExceeded: ...".
_DECIDED = re.compile(r"^([A-Z][A-Za-z]+):")
#: The operator's log line for an item failed on a max-deliveries advisory (mljob.controller.exhausted).
_EXHAUSTED = re.compile(
    r"item (?P<item>\S+) failed \(MaxDeliveriesExceeded, (?P<n>\d+) deliveries"
    r"(?:, (?P<s>[0-9.]+)s after exhaustion)?\)"
)
#: Series not worth showing: per-bucket histogram lines and creation timestamps.
_NOISE_SUFFIXES = ("_bucket", "_created")


@dataclass(frozen=True)
class Exhaustion:
    deliveries: int
    seconds: float | None


def reason_of(error: str | None, item_id: str) -> str:
    """The group of a failed item: the operator's reason (`MaxDeliveriesExceeded`), else the
    handler's message without the item's own id (`corrupt image header`)."""
    text = (error or "").strip()
    decided = _DECIDED.match(text)
    if decided:
        return decided.group(1)
    return text.replace(item_id, "").strip(" :") or "(no message)"


def group_failures(rows: Iterable[tuple[str, str | None]]) -> dict[str, list[str]]:
    """(item id, error) rows -> reason -> sorted item ids, the largest group first."""
    groups: dict[str, list[str]] = {}
    for item_id, error in rows:
        groups.setdefault(reason_of(error, item_id), []).append(item_id)
    return {r: sorted(ids) for r, ids in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))}


def format_groups(groups: Mapping[str, Sequence[str]], shown: int = 4) -> list[str]:
    width = max((len(r) for r in groups), default=0)
    lines = []
    for reason, ids in groups.items():
        listed = ", ".join(ids[:shown]) + (f", … (+{len(ids) - shown})" if len(ids) > shown else "")
        lines.append(f"  {reason.ljust(width)}  {len(ids):5d}  {listed}")
    return lines


def parse_exhaustions(log_text: str) -> dict[str, Exhaustion]:
    """Item -> deliveries and seconds from the max-deliveries advisory to the failed row, as
    the operator measured and logged them."""
    found: dict[str, Exhaustion] = {}
    for match in _EXHAUSTED.finditer(log_text):
        seconds = float(match["s"]) if match["s"] else None
        found[match["item"]] = Exhaustion(int(match["n"]), seconds)
    return found


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every `mljob_` sample (histogram buckets left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("mljob_") or sample.name.endswith(_NOISE_SUFFIXES):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return samples


def moved(before: Mapping[str, float], after: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """Series whose value changed (a series new since `before` counts from 0), by name."""
    out = []
    for name in sorted(after):
        old, new = before.get(name, 0.0), after[name]
        if not (math.isclose(old, new) or (math.isnan(old) and math.isnan(new))):
            out.append((name, old, new))
    return out


def _number(value: float) -> str:
    return f"{value:g}" if value == int(value) else f"{value:.3f}"


def format_moved(rows: Sequence[tuple[str, float, float]]) -> list[str]:
    width = max((len(name) for name, _, _ in rows), default=0)
    return [f"  {name.ljust(width)}  {_number(old):>8} -> {_number(new)}" for name, old, new in rows]


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


# ------------------------------------------------------------------ gathering (needs the stack)


def crashes_line(state: Mapping[str, Any]) -> str:
    """What the worker supervisor saw: how often a worker died, with which exit statuses."""
    exits = state.get("exits", [])
    codes = ", ".join(str(c) for c in sorted({int(e["code"]) for e in exits})) or "-"
    return f"worker processes died {len(exits)} time(s) (exit status {codes}); each was restarted"


def postgres_section(
    dsn: str, uid: str, crash_items: Sequence[str], log_text: str, crashes: str = ""
) -> list[str]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        job = conn.execute(
            "SELECT phase, reason, total, processed, failed FROM mljob_jobs WHERE uid = %s", (uid,)
        ).fetchone()
        outcomes = conn.execute(
            "SELECT outcome, count(*) FROM mljob_results WHERE job_uid = %s GROUP BY 1 ORDER BY 1", (uid,)
        ).fetchall()
        failed = conn.execute(
            "SELECT item_id, error, attempts FROM mljob_results WHERE job_uid = %s AND outcome = 'failed'",
            (uid,),
        ).fetchall()
    lines = ["==> Postgres (the arbiter): the job row, results by outcome, failed items by reason"]
    if job is None:
        return [*lines, "  no mljob_jobs row for this job"]
    phase, reason, total, processed, nfailed = job
    lines.append(
        f"  mljob_jobs: phase={phase} reason={reason} total={total} processed={processed} failed={nfailed}"
    )
    lines.append("  mljob_results: " + ", ".join(f"{outcome} {count}" for outcome, count in outcomes))
    lines += format_groups(group_failures((item, error) for item, error, _ in failed))
    by_item = {item: (error, attempts) for item, error, attempts in failed}
    exhaustions = parse_exhaustions(log_text)
    if crash_items:
        lines.append("  the crash items (each killed its worker on every delivery):")
        if crashes:
            lines.append(f"    {crashes}")
    for item in crash_items:
        if item not in by_item:
            lines.append(f"    {item}: NOT failed")
            continue
        error, attempts = by_item[item]
        seen = exhaustions.get(item)
        when = (
            f", failed row {seen.seconds:.2f}s after exhaustion"
            if seen is not None and seen.seconds is not None
            else ""
        )
        lines.append(f"    {item}: {reason_of(error, item)} after {attempts} deliveries{when}")
    return lines


async def _leftovers(
    redis_url: str, prefix: str, uid: str, pipeline: str, cluster: bool = False
) -> dict[str, Any]:
    import nats
    from nats.js.errors import KeyNotFoundError, NotFoundError

    from mljob import protocol
    from mljob.adapters import jetstream, redis_state
    from mljob.settings import NatsSettings
    from mljob.transport import natsconn

    nc = await nats.connect(**natsconn.options(NatsSettings(), name="mljob-demo-report", connect_timeout=5))
    redis = redis_state.connect(redis_url, 2, cluster=cluster)
    try:
        js = nc.jetstream()
        found: dict[str, Any] = {"registry": True}
        found["consumer"] = await jetstream.job_consumer_exists(js, pipeline, uid)
        found["tasks"] = await jetstream.job_task_count(js, pipeline, uid)
        try:
            kv = await js.key_value(protocol.REGISTRY_BUCKET)
            await kv.get(protocol.registry_key(pipeline, uid))
        except (KeyNotFoundError, NotFoundError):
            found["registry"] = False
        found["redis"] = [k.decode() async for k in redis.scan_iter(match=f"{prefix}:{{{uid}}}:*")]
        return found
    finally:
        await nc.close()
        await redis.aclose()


def cleanup_section(uid: str, pipeline: str, wait_seconds: float = 30.0) -> tuple[list[str], bool]:
    """Wait (a little) for the operator's cleanup, then say what is left: nothing, we hope."""
    from mljob import protocol
    from mljob.settings import CollectorSettings

    redis_url = os.environ["MLJOB_REDIS_URL"]
    prefix = os.environ.get("MLJOB_REDIS_PREFIX", "mljob")
    cluster = CollectorSettings().redis_cluster
    deadline = time.monotonic() + wait_seconds
    while True:
        left = asyncio.run(_leftovers(redis_url, prefix, uid, pipeline, cluster))
        clean = not (left["consumer"] or left["tasks"] or left["registry"] or left["redis"])
        if clean or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lines = [
        "==> cleanup: the job's NATS consumer and tasks, registry entry and Redis keys",
        f"  consumer {protocol.task_stream(pipeline)}/{protocol.task_consumer(uid)}: "
        f"{'STILL THERE' if left['consumer'] else 'gone'}",
        f"  tasks on {protocol.task_subject(pipeline, uid)}: {left['tasks']}",
        f"  registry {protocol.REGISTRY_BUCKET}/{protocol.registry_key(pipeline, uid)}: "
        f"{'STILL THERE' if left['registry'] else 'gone'}",
        f"  Redis {prefix}:{{{uid}}}:*: {len(left['redis'])} key(s)"
        + (f" {left['redis']}" if left["redis"] else ""),
    ]
    return lines, clean


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mljob_dev.demo.report", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    scr = sub.add_parser("scrape", help="print the text of a /metrics URL (nothing when unreachable)")
    scr.add_argument("url")
    rep = sub.add_parser("report", help="the demo's final report")
    rep.add_argument("--uid", required=True)
    rep.add_argument("--pipeline", required=True)
    rep.add_argument("--crash-items", default="")
    rep.add_argument("--operator-log", type=Path, required=True)
    rep.add_argument("--workers-state", type=Path, help="the worker supervisor's state file")
    rep.add_argument("--metrics-url", help="the operator's /metrics (omit: no metrics section)")
    rep.add_argument("--metrics-before", type=Path, help="a scrape taken before the job")
    args = parser.parse_args(argv)
    from mljob.ops import logs

    logs.drop_noise()  # its NATS connection's TLS teardown would print asyncio's warning
    if args.command == "scrape":
        try:
            sys.stdout.write(scrape(args.url))
        except OSError as err:
            print(f"no metrics at {args.url}: {err}", file=sys.stderr)
        return 0

    crash_items = [i for i in args.crash_items.split(",") if i]
    log_text = args.operator_log.read_text(errors="replace")
    crashes = ""
    if args.workers_state and args.workers_state.exists():
        crashes = crashes_line(json.loads(args.workers_state.read_text()))
    out = postgres_section(os.environ["MLJOB_POSTGRES_DSN"], args.uid, crash_items, log_text, crashes)
    if args.metrics_url:
        before = (
            args.metrics_before.read_text() if args.metrics_before and args.metrics_before.exists() else ""
        )
        try:
            after = scrape(args.metrics_url)
        except OSError:
            after = ""
        if after:
            out.append(f"==> metrics that moved during the job ({args.metrics_url})")
            out += format_moved(moved(parse_metrics(before), parse_metrics(after))) or ["  (none)"]
    cleanup, clean = cleanup_section(args.uid, args.pipeline)
    out += cleanup
    print("\n".join(out), flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
