"""Log lines of the operator and the collector: text or JSON, each line about a job naming it.

Why a context variable: a job's reconcile loop runs in its own kopf daemon task, and every
action, store call and helper under it logs through plain module loggers. Setting the job once
per task (`job_context`) puts its namespace, name and uid on every line logged in that task,
including asyncio tasks and threads it starts (they copy the context), without passing a
logger around. Lines outside a job task may name a job with `extra=job_extra(uid)`; kopf's own
object lines carry `k8s_ref`, which is read too.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

#: (namespace, name, uid) of the job the current task works on.
_JOB: ContextVar[tuple[str, str, str] | None] = ContextVar("mljob_job", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Loggers too chatty at INFO for an operator's log.
QUIET = {
    "kopf.objects": logging.WARNING,
    "kopf._core.engines.peering": logging.WARNING,
    "kopf.activities.probe": logging.WARNING,
    "psycopg.pool": logging.ERROR,  # "cannot reach Postgres" is logged by us, once
    "aiohttp.access": logging.WARNING,
}
#: (logger, exact message) of lines that report nothing a user did or can change. asyncio's
#: sslproto logs the first when a TLS peer closes a connection whose protocol asked to stay
#: half-open: nats-py's does, and every TLS connection to NATS says it once when it closes.
NOISE = {("asyncio", "returning true from eof_received() has no effect when using ssl")}


@contextmanager
def job_context(namespace: str, name: str, uid: str) -> Iterator[None]:
    """Every line logged in this task (and what it starts) until exit names this job."""
    token = _JOB.set((namespace, name, uid))
    try:
        yield
    finally:
        _JOB.reset(token)


def job_extra(uid: str, namespace: str = "", name: str = "") -> dict[str, str]:
    """`extra=` for a line about a job logged outside its task (only the uid may be known)."""
    return {"mljob_uid": uid, "mljob_namespace": namespace, "mljob_name": name}


def job_of(record: logging.LogRecord) -> tuple[str, str, str] | None:
    """(namespace, name, uid) of the job a record is about, if any."""
    uid = getattr(record, "mljob_uid", "")
    if uid:
        return getattr(record, "mljob_namespace", ""), getattr(record, "mljob_name", ""), uid
    ref = getattr(record, "k8s_ref", None)
    if isinstance(ref, dict) and ref.get("uid"):
        return str(ref.get("namespace") or ""), str(ref.get("name") or ""), str(ref["uid"])
    return _JOB.get()


class JobFilter(logging.Filter):
    """Stamps the current job on each record (as `mljob_*` attributes) before formatting."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = job_of(record)
        if job is not None:
            record.mljob_namespace, record.mljob_name, record.mljob_uid = job
        return True


class DropNoise(logging.Filter):
    """Drops the records listed in `NOISE` (exact messages), lets every other one through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.name, record.getMessage()) not in NOISE


def drop_noise() -> None:
    """Filter `NOISE` at its loggers, so it is dropped whatever handler would print it (also
    logging's last-resort handler in a process that configured none). Idempotent."""
    for name in {name for name, _ in NOISE}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise())


class TextFormatter(logging.Formatter):
    """The usual line, plus ` [job ns/name uid]` unless the message already names the uid."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = job_of(record)
        if job is None or job[2] in record.getMessage():
            return line
        namespace, name, uid = job
        where = f"{namespace}/{name} " if name else ""
        head, sep, rest = line.partition("\n")  # after the message, before a traceback
        return f"{head} [job {where}{uid}]{sep}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the job's fields, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job = job_of(record)
        if job is not None:
            namespace, name, uid = job
            out.update(namespace=namespace, job=f"{namespace}/{name}" if name else "", uid=uid)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False)


def setup(level: str, fmt: str = "text") -> None:
    """Configure the root logger once for the process: `fmt` is "text" or "json"."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(quiet)
    drop_noise()
