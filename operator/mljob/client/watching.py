"""Live MLJobs: a list and then watches of the apiserver (`Feed`), drawn as progress bars
(`watch`) or waited on by one job (`wait`, with tqdm's bar where tqdm is installed).

Each watch request asks the apiserver for the changes after the last resourceVersion seen and
to end after about a second, so the caller redraws at least that often and nothing runs in a
thread (a thread blocked in a read could not be stopped cleanly at exit); a version that expired
(410 Gone) is listed again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, TextIO

from mljob.client.errors import Conflict, NotFound
from mljob.client.jobs import Jobs
from mljob.client.progress import JobView, Painter, Tracker, bar, view


class Feed:
    """The MLJobs of `namespace` (None: all) named `names` (None: all of them), kept current."""

    def __init__(self, jobs: Jobs, namespace: str | None, names: Collection[str] | None = None) -> None:
        self.jobs = jobs
        self.namespace = namespace
        self.names = set(names) if names else None
        self.version = ""

    def _wanted(self, body: Mapping[str, Any]) -> bool:
        return self.names is None or (body.get("metadata") or {}).get("name") in self.names

    def start(self) -> list[dict[str, Any]]:
        """The MLJobs now; `drain` then gives what changes."""
        found = self.jobs.list(self.namespace)
        self.version = str((found.get("metadata") or {}).get("resourceVersion") or "")
        return [body for body in found.get("items") or [] if self._wanted(body)]

    def drain(self, timeout: float) -> list[tuple[dict[str, Any], bool]]:
        """The changes within about `timeout` seconds (at least one): (MLJob, deleted) each."""
        out: list[tuple[dict[str, Any], bool]] = []
        try:
            for event in self.jobs.watch(self.namespace, self.version, max(round(timeout), 1)):
                body = event.get("object") or {}
                self.version = str((body.get("metadata") or {}).get("resourceVersion") or self.version)
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED") and self._wanted(body):
                    out.append((body, event.get("type") == "DELETED"))
        except Conflict:  # the version expired: what is there now, then changes from there
            out.extend((body, False) for body in self.start())
        return out


def watch(
    jobs: Jobs,
    namespace: str | None,
    names: Collection[str],
    painter: Painter,
    interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    width: int = 24,
) -> list[JobView]:
    """Draw the jobs until every named one has finished (or was deleted); with no names, until
    interrupted. Returns the named jobs as they ended."""
    feed = Feed(jobs, namespace, names)
    tracker = Tracker()
    try:
        for body in feed.start():
            tracker.update(view(body), clock())
        missing = sorted(set(names) - {name for _, name in tracker.jobs})
        if missing:
            where = f"namespace {namespace!r}" if namespace else "any namespace"
            raise NotFound(f"no MLJob {', '.join(repr(n) for n in missing)} in {where}")
        while True:
            now = clock()
            keys = sorted(tracker.jobs)
            painter.paint(
                tracker.frame(now, width, namespaced=namespace is None) or ["(no MLJobs yet)"],
                [f"{ns}/{n}" for ns, n in keys] or ["-"],
            )
            if names and all(job.done for job in tracker.jobs.values()):
                painter.done()
                return [tracker.jobs[key] for key in keys]
            for body, deleted in feed.drain(interval):
                tracker.update(view(body, deleted), clock())
    finally:
        painter.done()


def wait(
    jobs: Jobs,
    namespace: str,
    name: str,
    timeout: float | None = None,
    progress: bool = True,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """The MLJob once it has finished (TimeoutError after `timeout` seconds); with `progress`, a
    bar meanwhile: tqdm's (its notebook widget in Jupyter) where tqdm is installed, else a line."""
    feed = Feed(jobs, namespace, [name])
    bodies = feed.start()
    if not bodies:
        raise NotFound(f"no MLJob {name!r} in namespace {namespace!r}")
    body = bodies[0]
    deadline = None if timeout is None else clock() + timeout
    shown = _Bar(name, out or sys.stderr) if progress else None
    tracker = Tracker()
    try:
        while True:
            job, now = view(body), clock()
            tracker.update(job, now)
            if shown is not None:
                shown.show(job, tracker, now)
            if job.done:
                return body
            left = None if deadline is None else deadline - clock()
            if left is not None and left <= 0:
                raise TimeoutError(f"MLJob {namespace}/{name} is still {job.phase} after {timeout:g}s")
            for changed, deleted in feed.drain(min(left, 1.0) if left is not None else 1.0):
                if deleted:
                    raise NotFound(f"MLJob {namespace}/{name} was deleted before it finished")
                body = changed
    finally:
        if shown is not None:
            shown.close()


class _Bar:
    """tqdm's bar when tqdm is installed, else the plain one of `mljob watch`."""

    def __init__(self, name: str, out: TextIO) -> None:
        self.name = name
        self.out = out
        self.tqdm: Any = None
        self.painter = Painter(out, out.isatty())
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.tqdm = tqdm(total=0, desc=name, unit="item", file=out, dynamic_ncols=True)

    def show(self, job: JobView, tracker: Tracker, now: float) -> None:
        if self.tqdm is None:
            self.painter.paint([bar(job, tracker.rate(job.key, now))], [self.name])
            return
        if job.total and self.tqdm.total != job.total:
            self.tqdm.total = job.total
        self.tqdm.n = min(job.processed, job.total) if job.total else job.processed
        self.tqdm.set_postfix(failed=job.failed, phase=job.phase, refresh=False)
        self.tqdm.refresh()

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        else:
            self.painter.done()
