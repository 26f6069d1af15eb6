"""What the mljob benchmarks share: the operator and workers as processes, MLJobs, and their clock.

* `Session`: one operator (`mljob operator --namespace <ns>`, the stack's operator identity, the
  collector in-process) watching a namespace of its own, with its own Postgres schema and Redis
  key prefix, so runs never see each other's rows or keys; workers (`mljob worker`) on the stack's
  worker identity, plain or kept alive by mljob's demo supervisor. Leaving the session deletes
  its MLJobs while the operator still runs (their finalizers need it), then stops every process
  it started and drops its schema.
* `JobWatch`: a watch on the namespace's MLJobs that stamps, with this machine's clocks, when each
  one was first seen created, dispatched (`Running` and `dispatchCursor == total`) and terminal.
  A benchmark's clock starts when the watch sees the MLJob created (so the cost of starting
  `kubectl` is not counted: the baselines start with their producer already running) and stops
  when the watch sees the phase it waits for.
* `Profiler`: py-spy attached to a running process for the measured interval only (`--profile`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import common

GROUP, VERSION, PLURAL = "mljob.dev", "v1alpha1", "mljobs"
TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled"})
#: Items per ConfigMap: 10,000 JSON lines of ~70 bytes stay far below the 1 MiB object limit.
PER_CONFIGMAP = 10_000


class Proc:
    """A process of its own session whose output goes to a log file; `stop` ends its group."""

    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            list(cmd),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=common.ROOT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds; always reaped."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(wait)
        with contextlib.suppress(ProcessLookupError):  # leftovers of the group (a supervisor's workers)
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()


# ---------------------------------------------------------------------- manifests and kubectl
def kubectl(
    stack: common.BenchStack, *args: str, stdin: str | None = None, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """kubectl against the stack (its KUBECONFIG); raises BenchError with its output on failure."""
    env = {**os.environ, **stack.env}
    proc = subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        raise common.BenchError(f"kubectl {' '.join(args[:4])} ...: {proc.stderr.strip() or proc.stdout}")
    return proc


def install_crds(stack: common.BenchStack) -> None:
    """The MLJob CRD and its admission policy, as a user installs them (idempotent)."""
    kubectl(stack, "apply", "--server-side", "--force-conflicts", "-f", str(common.ROOT / "crds"))
    kubectl(stack, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}")
    common.wait_until(
        lambda: (
            subprocess.run(
                ["kubectl", "get", PLURAL, "-A"], capture_output=True, env={**os.environ, **stack.env}
            ).returncode
            == 0
        ),
        60,
        "the MLJob API to be served",
        interval=0.5,
    )


def configmaps(name: str, items: int, per_map: int = PER_CONFIGMAP) -> tuple[list[str], list[dict[str, Any]]]:
    """ConfigMaps holding the benchmark's items as JSON lines (`{"id": ..., "uri": ...}`: the same
    items as the baselines' tasks), `per_map` to a ConfigMap."""
    names, docs = [], []
    for start in range(0, items, per_map):
        cm = f"{name}-items-{start // per_map}"
        lines = (
            json.dumps(common.item(i), separators=(",", ":"))
            for i in range(start, min(items, start + per_map))
        )
        names.append(cm)
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": cm},
                "data": {"items": "\n".join(lines)},
            }
        )
    return names, docs


def mljob(
    name: str,
    pipeline: str,
    *,
    items: list[Any] | None = None,
    config_maps: list[str] | None = None,
    params: Mapping[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """An MLJob manifest: inline `items` or `config_maps`, the baselines' params unless given."""
    body: dict[str, Any] = {"pipeline": pipeline, "params": dict(common.PARAMS if params is None else params)}
    if items is not None:
        body["items"] = items
    if config_maps is not None:
        body["itemsFrom"] = {"configMaps": config_maps}
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MLJob", "metadata": {"name": name}, "spec": body}


def apply(stack: common.BenchStack, namespace: str, docs: Sequence[Mapping[str, Any]]) -> None:
    """`kubectl apply --server-side` of `docs` (one List) into `namespace`."""
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)})
    kubectl(stack, "-n", namespace, "apply", "--server-side", "-f", "-", stdin=manifest)


def apiserver_requests(stack: common.BenchStack) -> dict[str, int]:
    """Requests the apiserver served so far, by "VERB resource[/subresource]" (its own metrics),
    for MLJobs, Events and ConfigMaps; watches and lists left out (the benchmark's watch)."""
    out: dict[str, int] = {}
    for line in kubectl(stack, "get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(
            part.split("=", 1)
            for part in line[line.index("{") + 1 : line.rindex("}")].replace('"', "").split(",")
        )
        verb, resource = labels.get("verb", ""), labels.get("resource", "")
        if resource not in ("mljobs", "events", "configmaps") or verb in ("WATCH", "LIST"):
            continue
        key = f"{verb} {resource}" + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def requests_between(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in sorted(after.items()) if n - before.get(k, 0) > 0}


# ---------------------------------------------------------------------- the watch
@dataclass
class JobTimes:
    """When the watch first saw an MLJob in each state: wall clock (`time.time()`, comparable to
    Postgres's `now()` on this machine) and monotonic (for durations)."""

    name: str
    uid: str = ""
    created: tuple[float, float] | None = None
    dispatched: tuple[float, float] | None = None
    #: the first status with a dispatch cursor above 0 (the first chunk published): its times and cursor
    first_chunk: tuple[float, float, int] | None = None
    terminal: tuple[float, float] | None = None
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def phase(self) -> str:
        return str(self.status.get("phase", ""))


class JobWatch:
    """Watches the MLJobs of a namespace in a thread of its own (see the module's docstring)."""

    def __init__(self, stack: common.BenchStack, namespace: str) -> None:
        self.kubeconfig = stack.env["KUBECONFIG"]
        self.namespace = namespace
        self.jobs: dict[str, JobTimes] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mljob-watch", daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> JobWatch:
        self._thread.start()
        if not self._ready.wait(60):
            raise common.BenchError("the MLJob watch did not start within 60s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        self._thread.join(10)

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client import CustomObjectsApi
        from kubernetes.config import new_client_from_config

        api = CustomObjectsApi(new_client_from_config(config_file=self.kubeconfig))
        while not self._stopping:
            try:
                listed = api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
                for obj in listed.get("items", []):
                    self._saw(obj)
                self._ready.set()
                stream = watch.Watch().stream(
                    api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    resource_version=listed["metadata"]["resourceVersion"],
                    timeout_seconds=5,
                )
                for event in stream:
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._saw(event["object"])
                    if self._stopping:
                        break
            except Exception as err:
                if "410" not in str(err):
                    self._error = err
                time.sleep(0.2)

    def _saw(self, obj: Mapping[str, Any]) -> None:
        now = (time.time(), time.monotonic())
        name = obj["metadata"]["name"]
        status = dict(obj.get("status") or {})
        with self._cond:
            times = self.jobs.setdefault(name, JobTimes(name, uid=obj["metadata"]["uid"]))
            if times.created is None:
                times.created = now
            times.status = status
            total = int(status.get("total") or 0)
            cursor = int(status.get("dispatchCursor") or 0)
            phase = status.get("phase")
            if times.first_chunk is None and cursor > 0:
                times.first_chunk = (*now, cursor)
            if times.dispatched is None and total > 0 and cursor >= total and phase in {"Running", *TERMINAL}:
                times.dispatched = now
            if times.terminal is None and phase in TERMINAL:
                times.terminal = now
            self._cond.notify_all()

    def wait(self, names: Sequence[str], state: str, timeout: float) -> list[JobTimes]:
        """Until every job in `names` reached `state` ("created", "dispatched", "terminal")."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                waiting = [n for n in names if getattr(self.jobs.get(n, JobTimes(n)), state) is None]
                if not waiting:
                    return [self.jobs[n] for n in names]
                left = deadline - time.monotonic()
                if left <= 0:
                    shown = {n: self.jobs[n].status if n in self.jobs else None for n in waiting[:3]}
                    raise common.BenchError(
                        f"{len(waiting)} MLJob(s) not {state} within {timeout:.0f}s "
                        f"(watch error: {self._error}); status: {json.dumps(shown)[:2000]}"
                    )
                self._cond.wait(min(left, 1.0))


# ---------------------------------------------------------------------- the session
class Session:
    """One operator on a namespace, schema and key prefix of its own, and the workers of a run."""

    def __init__(self, stack: common.BenchStack, log_dir: Path, label: str) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.stack = stack
        self.log_dir = log_dir
        self.label = label
        self.namespace = f"bench-{label}-{suffix}"
        self.schema = f"bench_{suffix}"
        self.prefix = f"bench{suffix}"
        self.operator: Proc | None = None
        self.workers: list[Proc] = []
        self.profilers: list[Profiler] = []
        #: operators started after the first (restarts)
        self.relaunches = 0

    def env(self, role: str | None = None, **extra: str) -> dict[str, str]:
        """A role's environment: the stack's, this session's schema and prefix, no metrics port (a
        host may run other operators; `extra` may set a free one), and the stack's NATS identity
        for `role`."""
        base = {
            "MLJOB_POSTGRES_SCHEMA": self.schema,
            "MLJOB_REDIS_PREFIX": self.prefix,
            "MLJOB_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
        return self.stack.child_env(role, **{**base, **extra})

    def start_operator(self, **extra: str) -> Proc:
        """`mljob operator --namespace <ns>` on the stack's operator identity (its default)."""
        kubectl(self.stack, "create", "namespace", self.namespace)
        self.operator = Proc(f"{self.label}-operator", self._operator_cmd(), self.env(**extra), self.log_dir)
        return self.operator

    def _operator_cmd(self) -> list[str]:
        return [sys.executable, "-m", "mljob.cli.main", "operator", "--namespace", self.namespace]

    def relaunch_operator(self, **extra: str) -> Proc:
        """A new operator process on the same namespace, schema and prefix, after the previous one
        was stopped (a restart); its log is a file of its own."""
        if self.operator is not None and self.operator.alive():
            raise common.BenchError("relaunch_operator: the operator still runs; stop it first")
        self.relaunches += 1
        name = f"{self.label}-operator-{self.relaunches + 1}"
        self.operator = Proc(name, self._operator_cmd(), self.env(**extra), self.log_dir)
        return self.operator

    def worker_cmd(self, pipeline: str, handler: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mljob.cli.main",
            "worker",
            "--pipeline",
            pipeline,
            "--handler",
            handler,
        ]

    def start_collector(self) -> Proc:
        """`mljob collector` on the stack's collector identity (for an operator started with
        MLJOB_RUN_COLLECTOR=false), kept with the workers so that the session checks and stops it."""
        cmd = [sys.executable, "-m", "mljob.cli.main", "collector"]
        proc = Proc(f"{self.label}-collector", cmd, self.env("collector"), self.log_dir)
        self.workers.append(proc)
        return proc

    def start_workers(self, pipeline: str, handler: str, count: int, **extra: str) -> list[Proc]:
        """`count` `mljob worker` processes on the stack's worker identity (`extra`: more of
        their environment, e.g. MLJOB_WORKER_CONCURRENCY)."""
        started = [
            Proc(
                f"{self.label}-worker-{i}",
                self.worker_cmd(pipeline, handler),
                self.env("worker", **extra),
                self.log_dir,
            )
            for i in range(count)
        ]
        self.workers.extend(started)
        return started

    def start_supervised_workers(self, pipeline: str, handler: str, count: int, worker_logs: Path) -> Proc:
        """`count` workers kept alive by mljob's demo supervisor (a dead one is started again),
        all on the stack's worker identity, their logs in `worker_logs`; returns the supervisor."""
        state = self.log_dir / f"{self.label}-supervisor.json"
        cmd = [sys.executable, "-m", "mljob_dev.demo.supervise", "--workers", str(count)]
        cmd += ["--log-dir", str(worker_logs), "--state", str(state)]
        cmd += ["--", *self.worker_cmd(pipeline, handler)]
        supervisor = Proc(f"{self.label}-supervisor", cmd, self.env("worker"), self.log_dir)
        self.workers.append(supervisor)
        return supervisor

    def wait_serving(self, procs: Sequence[Proc], timeout: float = 60.0) -> None:
        """Until each worker logged that it serves its pipeline (connected, watching the registry)."""
        for proc in procs:
            common.wait_until(
                lambda p=proc: "serving pipeline" in p.log_text() or not p.alive(),  # type: ignore[misc]
                timeout,
                f"{proc.name} to serve",
                interval=0.1,
            )
        self.check_alive()

    def check_alive(self) -> None:
        for proc in [*([self.operator] if self.operator else []), *self.workers]:
            if not proc.alive():
                raise common.BenchError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")

    def warm_up(self, watch: JobWatch, pipeline: str, state: str, timeout: float = 120.0) -> None:
        """A one-item MLJob on `pipeline` taken to `state` and deleted again: the operator has
        started, connected and created the pipeline's stream before the clock runs."""
        name = f"warm-up-{uuid.uuid4().hex[:6]}"
        apply(self.stack, self.namespace, [mljob(name, pipeline, items=["warm-up-item"])])
        try:
            watch.wait([name], state, timeout)
        except common.BenchError as err:
            self.check_alive()
            raise common.BenchError(f"{err}\n{self.operator.log_tail() if self.operator else ''}") from err
        self.delete_jobs(name)

    def timed_job(
        self,
        watch: JobWatch,
        name: str,
        pipeline: str,
        items: int,
        state: str,
        roles: Mapping[str, Sequence[int]],
        profile: str | None,
        items_from: Mapping[str, Any] | None = None,
    ) -> tuple[JobTimes, dict[str, float], dict[str, int]]:
        """One MLJob of `items` items from ConfigMaps (or `items_from`, e.g. a URL manifest's
        `{url, sha256}`), applied and waited for until `state`, under the CPU meter of `roles`
        (and py-spy on each of their processes with `profile`, a directory). The ConfigMaps are
        applied first, before the clock runs. Returns the job's times, the CPU seconds and the
        apiserver requests from apply to `state`."""
        if items_from is None:
            maps, docs = configmaps(name, items)
            apply(self.stack, self.namespace, docs)
            doc = mljob(name, pipeline, config_maps=maps)
        else:
            doc = mljob(name, pipeline, itemsFrom=dict(items_from))
        meter = common.meter(self.stack, roles)
        profilers = [
            Profiler(pid, Path(profile), f"{self.label}-{role}")
            for role, pids in roles.items()
            for pid in pids
            if profile
        ]
        requests = apiserver_requests(self.stack)
        meter.start()
        apply(self.stack, self.namespace, [doc])
        try:
            job = watch.wait([name], state, common.stage_timeout(items))[0]
        except common.BenchError:
            self.check_alive()
            raise
        cpu = meter.stop()
        for profiler in profilers:
            profiler.stop()
        return job, cpu, requests_between(requests, apiserver_requests(self.stack))

    def delete_jobs(self, *names: str, timeout: float = 300.0) -> None:
        """Delete MLJobs (all of the namespace without names) and wait until they are gone."""
        targets = list(names) if names else ["--all"]
        kubectl(
            self.stack,
            *("-n", self.namespace, "delete", PLURAL, *targets, "--wait", f"--timeout={timeout:.0f}s"),
            timeout=timeout + 60,
        )

    def close(self) -> None:
        for profiler in self.profilers:
            profiler.stop()
        try:
            if self.operator is not None and self.operator.alive():
                self.delete_jobs()
        except (common.BenchError, subprocess.TimeoutExpired) as err:
            print(f"[{self.label}] could not delete the MLJobs: {err}", file=sys.stderr)
        for proc in reversed(self.workers):
            proc.stop()
        if self.operator is not None:
            self.operator.stop()
            # The stack runs no controller manager, so a deleted namespace keeps its objects: the
            # item ConfigMaps (the big ones) go first; the namespace stays Terminating, empty.
            with contextlib.suppress(common.BenchError, subprocess.TimeoutExpired):
                kubectl(self.stack, "-n", self.namespace, "delete", "configmaps", "--all", "--wait=false")
                kubectl(self.stack, "delete", "namespace", self.namespace, "--wait=false")
        self._drop_schema()

    def _drop_schema(self) -> None:
        import psycopg

        with psycopg.connect(self.stack.env["MLJOB_POSTGRES_DSN"], autocommit=True) as pg:
            pg.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'.encode())

    def pg(self) -> Any:
        """A Postgres connection on this session's schema."""
        import psycopg

        conn = psycopg.connect(self.stack.env["MLJOB_POSTGRES_DSN"], autocommit=True)
        conn.execute(f'SET search_path TO "{self.schema}"'.encode())
        return conn


@contextlib.contextmanager
def session(stack: common.BenchStack, log_dir: Path, label: str) -> Iterator[Session]:
    """A Session, closed (MLJobs deleted, processes stopped, schema dropped) whatever happens."""
    run = Session(stack, log_dir, label)
    try:
        yield run
    except BaseException:
        for proc in [*([run.operator] if run.operator else []), *run.workers]:
            print(f"----- {proc.name} (last lines)\n{proc.log_tail()}", file=sys.stderr)
        raise
    finally:
        run.close()


def log_dir(args: Any, name: str) -> Path:
    """Where a benchmark keeps its processes' logs: `--log-dir`, else a directory of its own."""
    import tempfile

    if getattr(args, "log_dir", None):
        path = Path(args.log_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix=f"{name}-"))


# ---------------------------------------------------------------------- profiling
#: Profiles written by this process: group (e.g. "e2e-2w-workers") -> its raw files.
PROFILES: dict[str, list[Path]] = {}


def profile_report() -> list[str]:
    """The tables of every profile group this process wrote, the files of a group merged."""
    from .profiling import Profile, tables

    out = []
    for group, paths in PROFILES.items():
        merged = Profile.merge([Profile.read(p) for p in paths if p.exists()])
        runs = f"{len(paths)} profiles merged" if len(paths) > 1 else "one profile"
        out.append(f"#### Profile: {group} ({runs})\n\n{tables(merged)}")
    return out


class Profiler:
    """py-spy attached to a running process until `stop`, writing collapsed stacks (`--format raw`,
    without line numbers, idle threads left out: where the CPU time went).

    `--nonblocking`: py-spy reads the stacks without pausing the process. Pausing it (py-spy's
    default) slowed the operator's dispatch down threefold on a 2-core machine and counted its
    idle executor threads as busy; the price is an occasional torn stack."""

    def __init__(self, pid: int, directory: Path, group: str, rate: int = 200) -> None:
        exe = Path(sys.executable).parent / "py-spy"
        binary = str(exe) if exe.exists() else "py-spy"
        directory.mkdir(parents=True, exist_ok=True)
        files = PROFILES.setdefault(group, [])
        output = directory / f"{group}-{len(files) + 1:02d}.txt"
        files.append(output)
        self.output = output
        self._log_path = output.with_suffix(".log")
        self._log = open(self._log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [binary, "record", "--pid", str(pid), "-o", str(output), "--format", "raw", "--nolineno"]
        cmd += ["--rate", str(rate), "--nonblocking"]
        try:
            self.popen: subprocess.Popen[bytes] | None = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError:
            self._log.close()
            raise common.BenchError("--profile needs py-spy: pip install py-spy") from None
        # py-spy says "Sampling process ..." once attached
        common.wait_until(
            lambda: (
                b"Sampling" in self._log_path.read_bytes()
                or self.popen is None
                or self.popen.poll() is not None
            ),
            30,
            f"py-spy to attach to {pid}",
            interval=0.1,
        )
        if self.popen.poll() is not None:
            raise common.BenchError(
                f"py-spy could not attach to {pid}: {self._log_path.read_text(errors='replace')}"
            )

    def stop(self) -> None:
        """SIGINT (py-spy's Ctrl-C: it writes its file and exits)."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None
        self._log.close()
