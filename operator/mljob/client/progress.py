"""Progress bars of MLJobs: `mljob watch` and `Client.wait`. The drawing is pure (`bar`,
`frame`, `Tracker`); `Painter` prints, redrawn in place on a terminal (ANSI cursor-up and
erase-line) and as plain lines otherwise: one per job when its counts or phase changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from mljob.client.rate import Rate, Sample, add, eta, format_duration, format_rate, rate

TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled"})
FULL, EMPTY = "█", "░"


@dataclass(frozen=True)
class JobView:
    """What a bar shows of one MLJob."""

    namespace: str
    name: str
    phase: str
    total: int
    processed: int
    failed: int
    deleted: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def done(self) -> bool:
        return self.deleted or self.phase in TERMINAL


def view(body: Mapping[str, Any], deleted: bool = False) -> JobView:
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return JobView(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        phase=str(status.get("phase") or "Pending"),
        total=int(status.get("total") or 0),
        processed=int(status.get("processed") or 0),
        failed=int(status.get("failed") or 0),
        deleted=deleted,
    )


def bar(job: JobView, current: Rate | None, width: int = 24, label: str | None = None) -> str:
    """`thumbs [██████████░░░░░░░░░░░░░░]  42%  4,200/10,000  failed 12  Running  140/s  ETA 41s`.

    The percentage rounds down (100 % only once every item has its outcome); a job whose items
    are not counted yet shows an empty bar.
    """
    total = job.total
    done = min(max(job.processed, 0), total) if total > 0 else 0
    filled = done * width // total if total > 0 else 0
    percent = done * 100 // total if total > 0 else 0
    phase = "Deleted" if job.deleted else job.phase
    line = (
        f"{label if label is not None else job.name} [{FULL * filled}{EMPTY * (width - filled)}] "
        f"{percent:3d}%  {done:,}/{total:,}  failed {job.failed:,}  {phase}"
    )
    if not job.done and current is not None:
        left = eta(total - done, current) if total > 0 else None
        line += f"  {format_rate(current.per_second)}  ETA {format_duration(left)}"
    return line


@dataclass
class Tracker:
    """The jobs being watched, their samples and so their rates."""

    window: float = 60.0
    jobs: dict[tuple[str, str], JobView] = field(default_factory=dict)
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def update(self, job: JobView, now: float) -> None:
        self.jobs[job.key] = job
        self.samples[job.key] = add(self.samples.get(job.key, []), (now, job.processed), keep=self.window * 2)

    def rate(self, key: tuple[str, str], now: float) -> Rate | None:
        return rate(self.samples.get(key, []), now, self.window)

    def frame(self, now: float, width: int = 24, namespaced: bool = False) -> list[str]:
        """One bar per job, sorted by namespace and name, names aligned."""
        ordered = sorted(self.jobs.values(), key=lambda j: j.key)
        labels = [f"{j.namespace}/{j.name}" if namespaced else j.name for j in ordered]
        pad = max((len(label) for label in labels), default=0)
        return [
            bar(job, self.rate(job.key, now), width, label.ljust(pad))
            for job, label in zip(ordered, labels, strict=True)
        ]


class Painter:
    """Frames to a stream: in place on a terminal, else the lines that changed since the last."""

    def __init__(self, out: TextIO, tty: bool, columns: int = 0) -> None:
        self.out = out
        self.tty = tty
        #: On a terminal, lines are cut to this width: a wrapped line would break the redraw.
        self.columns = columns
        self._drawn = 0
        self._last: dict[str, str] = {}

    def paint(self, lines: Sequence[str], keys: Sequence[str] | None = None) -> None:
        if self.tty:
            if self._drawn > 1:
                self.out.write(f"\x1b[{self._drawn - 1}A")
            if self.columns > 1:
                lines = [line[: self.columns - 1] for line in lines]
            self.out.write("\r" + "\n".join(f"{line}\x1b[K" for line in lines))
            self._drawn = len(lines)
        else:
            keys = list(keys) if keys is not None else list(lines)
            for key, line in zip(keys, lines, strict=True):
                # the rate and ETA change every second; a line is printed when the bar does
                shown = line.split("  ETA ")[0].rsplit("  ", 1)[0] if "  ETA " in line else line
                if self._last.get(key) != shown:
                    self.out.write(line + "\n")
                    self._last[key] = shown
        self.out.flush()

    def done(self) -> None:
        """Leave the cursor below the frame (once: later calls do nothing until the next paint)."""
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
        self._drawn = 0
