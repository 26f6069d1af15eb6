"""What every benchmark shares: the local stack, CPU accounting, child processes, the CLI, tables.

* The stack: the one whose environment is exported (as `make test` and `mljob dev stack env` do),
  the one in `--stack-dir`, or a new one started for this run and stopped at its end.
* CPU: seconds of user + system time of each component's process tree between two samples,
  services found by the PIDs in the stack's `stack.json`, the benchmark's own roles by the PIDs
  of the processes it started. A tree's time includes its children that exited and were reaped
  (a Postgres backend that disconnected still counts), so nothing that ran in between is lost.
* Results are ratios between runs on the same machine, printed as markdown tables; nothing here
  passes or fails on a number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent

#: The variables a reused stack must have exported (tests/conftest.py checks the same ones).
STACK_VARS = ("MLJOB_NATS_URL", "MLJOB_REDIS_URL", "MLJOB_POSTGRES_DSN", "MLJOB_STACK_DIR")
#: Component name in the tables -> the stack's process name in `stack.json`.
SERVICES = {
    "nats": "nats-server",
    "redis": "redis-server",
    "postgres": "postgres",
    "apiserver": "kube-apiserver",
    "etcd": "etcd",
}
#: Component -> the process name prefix of its nodes on the clustered stack (`--ha`).
CLUSTERED_PREFIXES: dict[str, tuple[str, ...]] = {
    "nats": ("nats-",),
    "redis": ("redis-cluster-",),
    "postgres": ("patroni-", "postgres-"),
}
#: Columns of the CPU table, in order. For a baseline, "operator" is the process that dispatches.
COMPONENTS = ("operator", "collector", "workers", *SERVICES)

# A ~200-byte task like an mljob one: protocol version, job reference, item, params.
JOB_NAMESPACE = "bench"
JOB_NAME = "bench-job"
PARAMS: dict[str, Any] = {"model": "noop-v1", "threshold": 0.5}


class BenchError(RuntimeError):
    """A benchmark could not run (a role died, a stage timed out); the message says which."""


# ---------------------------------------------------------------------- messages
def item(index: int) -> dict[str, Any]:
    return {"id": f"item-{index:07d}", "uri": f"s3://bench-inputs/batch/{index:07d}.json"}


def task_body(pipeline: str, job_uid: str, index: int) -> bytes:
    """The body of task `index`: the same shape and size as an mljob task (about 200 bytes)."""
    task = {
        "version": 2,
        "job": {"uid": job_uid, "namespace": JOB_NAMESPACE, "name": JOB_NAME, "pipeline": pipeline},
        "item": item(index),
        "params": PARAMS,
    }
    return json.dumps(task, separators=(",", ":")).encode()


def task_msg_id(job_uid: str, index: int) -> str:
    """The `Nats-Msg-Id` of a task, `<uid>:<item id>` like mljob's."""
    return f"{job_uid}:{item(index)['id']}"


def results_table_ddl(table: str) -> str:
    """A results table keyed (job, item) with mljob's ledger columns."""
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    job_uid text NOT NULL,
    item_id text NOT NULL,
    outcome text NOT NULL,
    result jsonb,
    error text,
    attempts int NOT NULL,
    worker text,
    finished_at timestamptz NOT NULL,
    PRIMARY KEY (job_uid, item_id)
)
"""


# ---------------------------------------------------------------------- the stack
@dataclass
class BenchStack:
    """A running local stack; `owned` when this process started it (and stops it)."""

    env: dict[str, str]
    directory: Path
    owned: bool

    def service_pids(self) -> dict[str, int]:
        """Component -> PID of its service (of its first node on a clustered stack), read again
        each time (a restart changes them)."""
        return {component: pids[0] for component, pids in self.service_groups().items()}

    def service_groups(self) -> dict[str, list[int]]:
        """Component -> the PIDs of all its processes: one on the single-node stack; on the
        clustered one (`--ha`) every node (nats-1..3, redis-cluster-1..6, both Postgres nodes)."""
        state = json.loads((self.directory / "stack.json").read_text())
        pids: dict[str, int] = state["pids"]
        groups: dict[str, list[int]] = {}
        for component, name in SERVICES.items():
            prefixes = CLUSTERED_PREFIXES.get(component, ())
            for process, pid in pids.items():
                if process == name or process.startswith(prefixes):
                    groups.setdefault(component, []).append(pid)
        return groups

    def child_env(self, role: str | None = None, **extra: str) -> dict[str, str]:
        """The environment of a role process: the stack's variables, `bench` importable, and the
        stack's NATS identity for `role` ("worker", "collector") when it has one."""
        from .wire import identity_env

        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, **self.env, "PYTHONPATH": path, **extra}
        return identity_env(env, role) if role else env


@contextlib.contextmanager
def local_stack(args: argparse.Namespace) -> Iterator[BenchStack]:
    """The stack to measure on; its variables are exported into this process's environment."""
    from mljob_dev.devstack import stack as devstack

    started = None
    if all(os.environ.get(v) for v in STACK_VARS):
        env = {k: v for k, v in os.environ.items() if k.startswith("MLJOB_") or k == "KUBECONFIG"}
        directory = Path(os.environ["MLJOB_STACK_DIR"])
    elif args.stack_dir and (Path(args.stack_dir) / devstack.STATE_FILE).exists():
        loaded = devstack.Stack.load(Path(args.stack_dir))
        dead = [name for name, pid in loaded.pids.items() if not psutil.pid_exists(pid)]
        if dead or not loaded.pids:
            raise BenchError(
                f"the stack in {args.stack_dir} is not running ({', '.join(dead) or 'no services'}): "
                f"stop it with `mljob dev stack down --dir {args.stack_dir}` or choose another --stack-dir"
            )
        env, directory = dict(loaded.env), loaded.directory
    else:
        begun = time.monotonic()
        print("starting a local stack ...", file=sys.stderr, flush=True)
        started = devstack.up(Path(args.stack_dir) if args.stack_dir else None, ha=getattr(args, "ha", False))
        print(f"stack up in {time.monotonic() - begun:.0f}s", file=sys.stderr, flush=True)
        env, directory = dict(started.env), started.directory
    os.environ.update(env)
    if started is not None:  # stopped (by `finally`) on SIGTERM too, not left running
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield BenchStack(env=env, directory=directory, owned=started is not None)
    finally:
        if started is not None:
            if args.keep_stack:
                print(f"stack kept running in {directory}", file=sys.stderr)
            else:
                devstack.down(directory, remove=not args.stack_dir)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


async def nats_connect(name: str) -> Any:
    """A NATS connection from the MLJOB_NATS_* environment (URL, user, password, CA), as mljob's."""
    import nats

    from mljob.ops import logs
    from mljob.settings import NatsSettings
    from mljob.transport import natsconn

    logs.drop_noise()  # nats-py's TLS teardown warning: nothing the benchmark did

    return await nats.connect(**natsconn.options(NatsSettings(), name=name))


# ---------------------------------------------------------------------- CPU accounting
def tree_cpu_seconds(pid: int, exclude: frozenset[int] = frozenset()) -> float:
    """User + system seconds of a process, its live descendants and its reaped children; the
    subtrees of `exclude` are left out (other components: a stack this process started)."""
    try:
        todo = [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    while todo:
        proc = todo.pop()
        try:
            t = proc.cpu_times()
            kids = proc.children()
        except psutil.NoSuchProcess:
            continue  # exited meanwhile: counted with its parent once reaped
        total += t.user + t.system + t.children_user + t.children_system
        todo.extend(k for k in kids if k.pid not in exclude)
    return total


class CpuMeter:
    """CPU seconds per component between `start` and `stop`.

    `groups`: component -> PIDs whose process trees make it up. Sample `stop` before ending a
    role's processes: the time of a child reaped by this process would be lost with it.
    """

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self._start: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        roots = frozenset(p for pids in self.groups.values() for p in pids)
        return {
            name: sum(tree_cpu_seconds(p, roots - {p}) for p in pids) for name, pids in self.groups.items()
        }

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        return {name: max(0.0, end[name] - self._start.get(name, 0.0)) for name in end}


def meter(stack: BenchStack, roles: Mapping[str, Sequence[int]]) -> CpuMeter:
    """A meter over the stack's services and the benchmark's own roles (e.g. "workers")."""
    groups = stack.service_groups()
    for name, pids in roles.items():
        groups.setdefault(name, []).extend(pids)
    return CpuMeter(groups)


# ---------------------------------------------------------------------- role processes
class Child:
    """A role process (its own session); speaks one line per event on stdout, reads lines on stdin.

    Lines that are not the one awaited are passed on to stderr, so a role's output is never lost.
    """

    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(env),
            cwd=ROOT,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, word: str, timeout: float) -> list[str]:
        """The tokens after `word` on the next line that starts with it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no {word!r} within {timeout:.0f}s")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                raise BenchError(f"{self.name} exited with status {code} before saying {word!r}")
            tokens = line.split()
            if tokens and tokens[0] == word:
                return tokens[1:]
            print(f"[{self.name}] {line}", file=sys.stderr)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the role's process group, SIGKILL after `grace` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        with contextlib.suppress(ProcessLookupError):  # leftovers of the group (a pool's children)
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """A list to put started roles in; every one is stopped on the way out, whatever happened."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            child.stop()


def role_say(word: str, *values: object) -> None:
    """In a role process: one line for the benchmark (see Child.expect)."""
    print(" ".join([word, *map(str, values)]), flush=True)


def role_wait_go() -> None:
    """In a role process: block until the benchmark says go (or closes stdin)."""
    sys.stdin.readline()


# ---------------------------------------------------------------------- CLI
def parser(description: str, default_items: int, workers: str | None = "1,2,4") -> argparse.ArgumentParser:
    """The flags every benchmark has: --items, --workers (when it has workers), the stack, output."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--items", type=int, default=default_items, help=f"items per run (default {default_items})"
    )
    if workers is not None:
        p.add_argument(
            "--workers",
            type=int_list,
            default=int_list(workers),
            help=f"worker process counts, comma-separated; one run each (default {workers})",
        )
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration; the median is shown")
    p.add_argument("--stack-dir", help="reuse the stack there, or start one there (default: a new one)")
    p.add_argument("--keep-stack", action="store_true", help="leave a stack this run started running")
    p.add_argument("--json", dest="json_path", help="append each shown run to this file as a JSON line")
    p.add_argument("--ha", action="store_true", help="start the clustered stack (`mljob dev stack up --ha`)")
    return p


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return values


# ---------------------------------------------------------------------- results and tables
@dataclass
class Run:
    """One measured run: `seconds` from apply (or first publish) to the last result stored."""

    benchmark: str
    system: str
    items: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)
    workers: int | None = None
    #: seconds from apply until every task was accepted by the broker (None: not measured)
    dispatch_seconds: float | None = None

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")

    @property
    def dispatch_items_per_second(self) -> float | None:
        if self.dispatch_seconds is None:
            return None
        return self.items / self.dispatch_seconds if self.dispatch_seconds > 0 else float("inf")

    def cpu_per_1000(self, component: str) -> float | None:
        seconds = self.cpu.get(component)
        return None if seconds is None else seconds * 1000 / self.items


def median_run(runs: Sequence[Run]) -> Run:
    """The run of median throughput (the slower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: r.items_per_second)
    return ordered[(len(ordered) - 1) // 2]


def repeat(times: int, once: Callable[[], Run]) -> Run:
    runs = [once() for _ in range(max(1, times))]
    return median_run(runs)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; the first column left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * widths[0], *("-" * (w - 1) + ":" for w in widths[1:])]
    return "\n".join([line(headers), "| " + " | ".join(rule) + " |", *(line(r) for r in rows)])


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def report(title: str, runs: Sequence[Run], json_path: str | None = None) -> str:
    """The throughput table (ratios to the first row) and the CPU table, as markdown."""
    if not runs:
        return f"### {title}\n\n(no runs)"
    reference = runs[0]
    with_workers = any(r.workers is not None for r in runs)
    with_dispatch = any(r.dispatch_seconds is not None for r in runs)
    headers = ["system", *(["workers"] if with_workers else []), "items", "seconds", "items/s"]
    if with_dispatch:
        headers.append("dispatch items/s")
    headers.append(f"vs {reference.system}" + (f" ({reference.workers}w)" if reference.workers else ""))
    rows = []
    for r in runs:
        row = [r.system, *([fmt(r.workers)] if with_workers else []), fmt(r.items), fmt(r.seconds, 2)]
        row.append(fmt(r.items_per_second))
        if with_dispatch:
            row.append(fmt(r.dispatch_items_per_second))
        row.append(f"{r.items_per_second / reference.items_per_second:.2f}")
        rows.append(row)
    shown = [c for c in COMPONENTS if any(c in r.cpu for r in runs)]
    cpu_headers = ["system", *(["workers"] if with_workers else []), *shown, "total"]
    cpu_rows = []
    for r in runs:
        cells = [fmt(r.cpu_per_1000(c), 3) for c in shown]
        total = sum(r.cpu.values()) * 1000 / r.items
        cpu_rows.append([r.system, *([fmt(r.workers)] if with_workers else []), *cells, fmt(total, 3)])
    text = "\n\n".join(
        [
            f"### {title}",
            markdown_table(headers, rows),
            "CPU seconds per 1,000 items (for a baseline, `operator` is its dispatching process):",
            markdown_table(cpu_headers, cpu_rows),
        ]
    )
    if json_path:
        append_json(json_path, title, [{**asdict(r), "items_per_second": r.items_per_second} for r in runs])
    return text


def append_json(path: str | None, title: str, records: Iterable[Mapping[str, Any]]) -> None:
    """Append each record as one JSON line tagged with `title` (`--json FILE`; nothing without)."""
    if not path:
        return
    with open(path, "a") as out:
        for record in records:
            out.write(json.dumps({"title": title, **record}) + "\n")


# ---------------------------------------------------------------------- the machine
def machine(stack: BenchStack | None = None) -> str:
    """What the figures were measured on, as markdown lines (no paths, no host names)."""
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    load1, _, _ = os.getloadavg()
    cores = os.cpu_count() or 1
    lines = [
        f"- CPU: {cpu_model}, {cores} logical cores; memory {psutil.virtual_memory().total / 2**30:.0f} GiB",
        f"- {platform.system()} {platform.release()}, Python {platform.python_version()}",
    ]
    if stack is not None:
        versions = [v for v in (_service_version(pid) for pid in stack.service_pids().values()) if v]
        if versions:
            lines.append("- services: " + "; ".join(versions))
    lines.append(f"- load average at start: {load1:.2f}")
    if load1 > cores / 2:
        lines.append("- **the machine was busy: these figures are noisy; compare ratios only**")
    return "\n".join(lines)


def _service_version(pid: int) -> str | None:
    try:
        proc = psutil.Process(pid)
        # argv[0], not exe(): redis-server is a link to redis-check-rdb, which answers as itself
        cmdline = proc.cmdline()
        exe = cmdline[0].split()[0] if cmdline else proc.exe()
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (psutil.Error, OSError, subprocess.SubprocessError):
        return None
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].split(" sha=")[0].strip() if first else None  # Redis: no build details


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def stage_timeout(items: int, floor: float = 120.0, per_second: float = 100.0) -> float:
    """A generous limit for one stage: no run should be slower than `per_second` items/s."""
    return max(floor, items / per_second)
