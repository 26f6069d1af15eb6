"""Top-N tables of py-spy profiles (`--format raw`: one collapsed stack and its sample count a line).

    python -m bench.profiling PROFILE.txt [...] [--top 15]

For each profile: the share of samples by thread kind (the event loop's thread against the
threads `asyncio.to_thread` and handlers run in), by package (the file a sample's innermost
frame is in), and the functions with the largest self and total (inclusive) shares. py-spy leaves
idle threads out, so 100 % is the time the process was busy, not the wall clock.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import markdown_table

#: Packages whose frames are the event loop's and the threads' own machinery (never a useful
#: "total" entry: every stack of their thread passes through them).
MACHINERY = frozenset({"asyncio", "threading", "concurrent", "runpy", "<frozen runpy>", "selectors"})
#: The processes' entry points: on every stack of the main thread.
ENTRY_POINTS = frozenset(
    {
        "main (mljob/cli/main.py)",
        "run (mljob/cli/operator.py)",
        "run_operator (mljob/controller/main.py)",
        "_cmd_worker (mljob/cli/worker.py)",
        "run_worker (mljob/worker/worker.py)",
    }
)


#: What the samples of an mljob process were doing: a name and the frame prefixes (or, ending in
#: "/", package paths) a stack passes through. A stack may pass through several.
THROUGH: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Kubernetes client calls (kubernetes, urllib3)", ("(kubernetes/", "(urllib3/")),
    ("Postgres (psycopg)", ("(psycopg/", "(psycopg_pool/")),
    ("Redis (redis-py)", ("(redis/",)),
    ("NATS client: writing (Client._flusher)", ("Client._flusher (nats/",)),
    ("NATS client: reading (Client._read_loop)", ("Client._read_loop (nats/",)),
    ("js.publish and its PubAck (a worker: each result)", ("JetStreamContext.publish (nats/",)),
    ("ack_sync (worker)", ("Msg.ack_sync (nats/",)),
    ("publish_async (dispatch)", ("JetStreamContext.publish_async (nats/",)),
    ("starting a thread (a worker: one per handler call)", ("Thread.start (threading",)),
    (
        "waking the loop from another thread (a handler call or to_thread ending)",
        ("BaseSelectorEventLoop._write_to_self",),
    ),
    ("collector (Collector.process)", ("Collector.process (mljob/",)),
    (
        "dispatch action (mljob/controller/actions/dispatch.py)",
        ("dispatch (mljob/controller/actions/dispatch.py)",),
    ),
    ("job loops (JobLoop.run)", ("JobLoop.run (mljob/",)),
    ("kopf (innermost frame in kopf)", ()),
    ("pydantic (innermost frame in pydantic)", ()),
    ("epoll wait (the loop found nothing to do)", ("EpollSelector.select (selectors",)),
)


@dataclass
class Profile:
    """Collapsed stacks (outermost frame first) and their sample counts."""

    stacks: list[tuple[list[str], int]]

    @classmethod
    def read(cls, path: Path) -> Profile:
        stacks = []
        for line in path.read_text(errors="replace").splitlines():
            text, _, count = line.rpartition(" ")
            if text and count.isdigit():
                stacks.append(([f.strip() for f in text.split(";") if f.strip()], int(count)))
        return cls(stacks)

    @classmethod
    def merge(cls, profiles: Sequence[Profile]) -> Profile:
        """One profile of several (e.g. of several runs, or of each worker process)."""
        return cls([stack for profile in profiles for stack in profile.stacks])

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.stacks)

    def self_shares(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for frames, n in self.stacks:
            if frames:
                out[frames[-1]] += n
        return out

    def total_shares(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for frames, n in self.stacks:
            for frame in set(frames):
                out[frame] += n
        return out

    def innermost_of_chains(self) -> set[str]:
        """Of frames found on exactly the same stacks (a chain of wrappers calling one another,
        e.g. kopf's handler invocation), the innermost one only."""
        stacks_of: dict[str, set[int]] = {}
        depth: dict[str, int] = {}
        for index, (frames, _) in enumerate(self.stacks):
            for level, frame in enumerate(frames):
                stacks_of.setdefault(frame, set()).add(index)
                depth[frame] = max(depth.get(frame, 0), level)
        deepest: dict[frozenset[int], str] = {}
        for frame, where in stacks_of.items():
            key = frozenset(where)
            if key not in deepest or depth[frame] > depth[deepest[key]]:
                deepest[key] = frame
        return set(deepest.values())

    def through_shares(self) -> list[tuple[str, int]]:
        """Samples per THROUGH entry (an empty prefix list: innermost frame in that package)."""
        out = []
        for name, prefixes in THROUGH:
            if prefixes:
                n = sum(
                    c
                    for frames, c in self.stacks
                    if any(f.startswith(prefixes) or _in(f, prefixes) for f in frames)
                )
            else:
                pkg = name.split(" ", 1)[0]
                n = sum(c for frames, c in self.stacks if frames and package(frames[-1]) == pkg)
            out.append((name, n))
        return out

    def package_shares(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for frames, n in self.stacks:
            if frames:
                out[package(frames[-1])] += n
        return out

    def thread_shares(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for frames, n in self.stacks:
            threaded = any(f.endswith("_bootstrap (threading.py)") for f in frames[:2])
            out["other threads (to_thread, handlers)" if threaded else "main thread (event loop)"] += n
        return out


def _in(frame: str, markers: tuple[str, ...]) -> bool:
    """Whether `frame` lies in one of the `(package/` markers."""
    return any(m.startswith("(") and m in frame for m in markers)


def package(frame: str) -> str:
    """The package of a frame `function (pkg/module.py)`: its first path part, or the module of a
    standard-library file (`ssl.py` -> ssl)."""
    where = frame.rpartition(" (")[2].rstrip(")")
    if not where:
        return frame  # a native frame, or py-spy's own marker
    return where.split("/", 1)[0].removesuffix(".py")


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}" if total else "-"


def tables(profile: Profile, top: int = 15) -> str:
    """The profile's tables as markdown."""
    total = profile.samples
    if not total:
        return "(no samples: the process was idle, or py-spy could not read it)"
    threads = [[name, _pct(n, total)] for name, n in profile.thread_shares().most_common()]
    through = [[name, _pct(n, total)] for name, n in profile.through_shares() if n]
    packages = [[name, _pct(n, total)] for name, n in profile.package_shares().most_common(top)]
    selfs = profile.self_shares()
    totals = profile.total_shares()
    by_self = [[f"`{f}`", _pct(n, total), _pct(totals[f], total)] for f, n in selfs.most_common(top)]
    shown = profile.innermost_of_chains()
    inclusive = [
        (f, n)
        for f, n in totals.most_common()
        if f in shown
        and package(f) not in MACHINERY
        and not f.startswith("<module>")
        and f not in ENTRY_POINTS
    ][:top]
    by_total = [[f"`{f}`", _pct(selfs.get(f, 0), total), _pct(n, total)] for f, n in inclusive]
    ours = [
        (f, n)
        for f, n in totals.most_common()
        if package(f) == "mljob" and f not in ENTRY_POINTS and not f.startswith("<module>")
    ][:top]
    by_ours = [[f"`{f}`", _pct(selfs.get(f, 0), total), _pct(n, total)] for f, n in ours]
    return "\n\n".join(
        [
            f"{total:,} samples (busy time only).",
            markdown_table(["thread", "% of samples"], threads),
            "Samples whose stack passes through ... (a stack may pass through several):",
            markdown_table(["what", "% of samples"], through),
            markdown_table(["package (innermost frame)", "% of samples"], packages),
            f"Top {top} functions by self time:",
            markdown_table(["function", "self %", "total %"], by_self),
            f"Top {top} functions by total (inclusive) time, without asyncio's and threading's own frames "
            "(of a chain of wrappers on exactly the same stacks, the innermost only):",
            markdown_table(["function", "self %", "total %"], by_total),
            f"Top {top} of mljob's own functions by total (inclusive) time:",
            markdown_table(["function", "self %", "total %"], by_ours),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profiles", nargs="+", type=Path, help="py-spy raw files (record --format raw)")
    p.add_argument("--top", type=int, default=15, help="rows per function table (default 15)")
    p.add_argument("--merge", action="store_true", help="one set of tables of all the files together")
    args = p.parse_args(argv)
    if args.merge:
        merged = Profile.merge([Profile.read(path) for path in args.profiles])
        print(f"#### {len(args.profiles)} profiles merged\n\n{tables(merged, args.top)}\n")
        return 0
    for path in args.profiles:
        print(f"#### {path.name}\n\n{tables(Profile.read(path), args.top)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
