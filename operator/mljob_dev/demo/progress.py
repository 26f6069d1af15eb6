"""Live progress of MLJobs for `make demo`: one bar per job, redrawn in place on a terminal.

On a terminal the lines are redrawn in place (carriage return and cursor-up); otherwise one line
per job per second, so a log or a test reads the run as a sequence. The drawing is pure
(`bar`, `frame`) and unit-tested; `watch` only polls the Kubernetes API and prints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})
FULL, EMPTY = "█", "░"


def bar(
    name: str, processed: int, failed: int, total: int, phase: str, *, width: int = 24, note: str = ""
) -> str:
    """`demo-classify [██████████░░░░░░] 62%  3100/5000  failed 61  Running`.

    The percentage rounds down, so 100 % means every item has its outcome; a job whose items are
    not counted yet (total 0) shows an empty bar.
    """
    done = min(max(processed, 0), total) if total > 0 else 0
    filled = done * width // total if total > 0 else 0
    percent = done * 100 // total if total > 0 else 0
    line = (
        f"{name} [{FULL * filled}{EMPTY * (width - filled)}] {percent:3d}%  "
        f"{done}/{total}  failed {failed}  {phase}"
    )
    return f"{line}  {note}" if note else line


def frame(jobs: Sequence[Mapping[str, Any]], *, width: int = 24, note: str = "") -> list[str]:
    """One bar per MLJob object (as the API returns it), names aligned, sorted by name."""
    rows = sorted(jobs, key=lambda j: str(j.get("metadata", {}).get("name", "")))
    pad = max((len(str(j.get("metadata", {}).get("name", ""))) for j in rows), default=0)
    lines = []
    for job in rows:
        status = job.get("status") or {}
        lines.append(
            bar(
                str(job.get("metadata", {}).get("name", "")).ljust(pad),
                int(status.get("processed") or 0),
                int(status.get("failed") or 0),
                int(status.get("total") or 0),
                str(status.get("phase") or "Pending"),
                width=width,
                note=note,
            )
        )
    return lines


def all_terminal(jobs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> bool:
    """Every watched job exists and reached a terminal phase."""
    phases = {j["metadata"]["name"]: (j.get("status") or {}).get("phase") for j in jobs}
    return all(phases.get(name) in TERMINAL_PHASES for name in names)


def crashes_note(state_file: Path | None) -> str:
    """ "worker crashes 2" from the supervisor's state file (nothing while there is none)."""
    if state_file is None:
        return ""
    try:
        crashes = int(json.loads(state_file.read_text()).get("crashes", 0))
    except (OSError, ValueError):
        return ""
    return f"worker crashes {crashes}" if crashes else ""


class Painter:
    """Prints frames: in place on a terminal, else line by line."""

    def __init__(self, out: TextIO, tty: bool, columns: int = 0) -> None:
        self.out = out
        self.tty = tty
        #: On a terminal, lines are cut to this width: a wrapped line would break the redraw.
        self.columns = columns
        self._drawn = 0

    def paint(self, lines: Sequence[str]) -> None:
        if self.tty:
            if self._drawn > 1:
                self.out.write(f"\x1b[{self._drawn - 1}A")
            if self.columns > 1:
                lines = [line[: self.columns - 1] for line in lines]
            self.out.write("\r" + "\n".join(f"{line}\x1b[K" for line in lines))
            self._drawn = len(lines)
        else:
            self.out.write("".join(f"{line}\n" for line in lines))
        self.out.flush()

    def done(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()


def watch(
    list_jobs: Callable[[], list[dict[str, Any]]],
    names: Sequence[str],
    painter: Painter,
    *,
    timeout: float,
    state_file: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Redraw until every named job is terminal (True) or `timeout` passes (False)."""
    interval = 0.5 if painter.tty else 1.0
    deadline = clock() + timeout
    while True:
        jobs = [j for j in list_jobs() if j["metadata"]["name"] in names]
        painter.paint(frame(jobs, note=crashes_note(state_file)) or ["(waiting for the MLJob)"])
        if all_terminal(jobs, names):
            painter.done()
            return True
        if clock() >= deadline:
            painter.done()
            return False
        sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mljob_dev.demo.progress", description=__doc__)
    parser.add_argument("names", nargs="+", help="MLJob names to watch")
    parser.add_argument("--namespace", "-n", default="default")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--workers-state", type=Path, help="the worker supervisor's state file")
    args = parser.parse_args(argv)

    from kubernetes import client, config

    config.load_kube_config()
    api = client.CustomObjectsApi()

    def list_jobs() -> list[dict[str, Any]]:
        found = api.list_namespaced_custom_object("mljob.dev", "v1alpha1", args.namespace, "mljobs")
        return list(found.get("items", []))

    painter = Painter(sys.stdout, sys.stdout.isatty(), shutil.get_terminal_size().columns)
    if watch(list_jobs, args.names, painter, timeout=args.timeout, state_file=args.workers_state):
        return 0
    print(f"error: not finished after {args.timeout:g}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
