"""One operator per test module, watching its own namespace, with its own schema and key prefix."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from support.harness import TERMINAL, Proc, child_env, mljob_cmd, mljob_manifest
from support.waiting import wait_for


@dataclass
class E2E:
    stack: Any
    kubectl: Any
    namespace: str
    schema: str
    prefix: str
    log_dir: Path
    operator: Proc | None = None
    procs: list[Proc] = field(default_factory=list)
    _api: Any = None

    # ------------------------------------------------------------------ processes
    @property
    def env(self) -> dict[str, str]:
        """The operator's environment (and the dev tools', e.g. `mljob chaos`)."""
        return self.env_of("operator")

    def env_of(self, role: str) -> dict[str, str]:
        """The environment of a process of `role`, with that role's NATS identity."""
        return child_env(
            self.stack.as_env(role),
            MLJOB_POSTGRES_SCHEMA=self.schema,
            MLJOB_REDIS_PREFIX=self.prefix,
            MLJOB_RECONCILE_INTERVAL="1",
            # Quiet jobs still back off (1, 2, 4 s), but a chaos step a test takes while a job
            # sits idle is seen within seconds, as these tests' waits expect.
            MLJOB_IDLE_RECONCILE_INTERVAL="4",
        )

    def start_collector(self, name: str = "collector", **env: str) -> Proc:
        """An external `mljob collector`, on the collector's NATS identity."""
        proc = Proc(name, mljob_cmd("collector"), {**self.env_of("collector"), **env}, self.log_dir)
        self.procs.append(proc)
        return proc

    def start_operator(self, *extra: str, **env: str) -> Proc:
        proc = Proc(
            "operator",
            mljob_cmd("operator", "--namespace", self.namespace, *extra),
            {**self.env, **env},
            self.log_dir,
        )
        self.operator = proc
        self.procs.append(proc)
        return proc

    def start_worker(self, pipeline: str, handler: str, *extra: str, **env: str) -> Proc:
        proc = Proc(
            f"worker-{pipeline}",
            mljob_cmd("worker", "--pipeline", pipeline, "--handler", f"support.handlers:{handler}", *extra),
            {**self.env_of("worker"), **env},
            self.log_dir,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"----- {p.name}\n{p.log_tail()}" for p in self.procs)

    # ------------------------------------------------------------------ MLJobs
    def apply(self, name: str, pipeline: str, items: list[Any] | None = None, **spec: Any) -> str:
        self.kubectl.run(
            "-n",
            self.namespace,
            "apply",
            "--server-side",
            "-f",
            "-",
            stdin=mljob_manifest(name, pipeline, items, **spec),
        )
        return str(self.get(name)["metadata"]["uid"])

    def get(self, name: str) -> dict[str, Any]:
        """The MLJob as the API server has it. Through the Python client, not a kubectl process:
        tests poll this several times a second, and a kubectl start costs a core for a moment."""
        from kubernetes.client import CustomObjectsApi
        from kubernetes.config import new_client_from_config

        if self._api is None:
            self._api = CustomObjectsApi(new_client_from_config(config_file=self.stack.kubeconfig))
        body: dict[str, Any] = self._api.get_namespaced_custom_object(
            "mljob.dev", "v1alpha1", self.namespace, "mljobs", name
        )
        return body

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def wait_phase(self, name: str, phases: set[str], timeout: float = 120) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") in phases else None

        try:
            result: dict[str, Any] = wait_for(reached, timeout, what=f"{name} to reach {phases}")
        except AssertionError as err:
            raise AssertionError(f"{err}; status={json.dumps(self.status(name))}\n{self.logs()}") from err
        return result

    def wait_terminal(self, name: str, timeout: float = 120) -> dict[str, Any]:
        return self.wait_phase(name, TERMINAL, timeout)

    # ------------------------------------------------------------------ stores
    def pg(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.stack.postgres_dsn, autocommit=True)
        conn.execute(f'SET search_path TO "{self.schema}"'.encode())
        return conn

    def job_row(self, uid: str) -> dict[str, Any] | None:
        with self.pg() as conn:
            cur = conn.execute(
                "SELECT phase, reason, total, processed, failed, completion_time FROM mljob_jobs "
                "WHERE uid = %s",
                (uid,),
            )
            row = cur.fetchone()
        if row is None:
            return None
        return dict(
            zip(("phase", "reason", "total", "processed", "failed", "completion_time"), row, strict=True)
        )

    def result_rows(self, uid: str) -> dict[str, str]:
        with self.pg() as conn:
            cur = conn.execute("SELECT item_id, outcome FROM mljob_results WHERE job_uid = %s", (uid,))
            return {item: outcome for item, outcome in cur.fetchall()}

    def redis_keys(self, uid: str) -> list[str]:
        """The job's keys: on a Redis Cluster they share the `{uid}` slot, so its primary holds
        them all; the cluster client's scan asks every primary, which finds strays too."""
        client: redis.Redis | redis.RedisCluster
        if self.stack.cluster_vars.get("MLJOB_REDIS_CLUSTER") == "true":
            client = redis.RedisCluster.from_url(self.stack.redis_url, decode_responses=True)
        else:
            client = redis.Redis.from_url(self.stack.redis_url, decode_responses=True)
        try:
            return list(client.scan_iter(match=f"{self.prefix}:{{{uid}}}:*"))
        finally:
            client.close()

    def nats_leftovers(self, uid: str, pipeline: str) -> dict[str, bool]:
        """Whether the job's consumer or any of its tasks, and its registry entry, still exist."""
        from mljob import protocol
        from mljob.adapters import jetstream

        async def check() -> dict[str, bool]:
            from nats.js.errors import KeyNotFoundError, NotFoundError

            nc = await self.stack.nats()
            js = nc.jetstream()
            out = {"consumer": True, "registry": True}
            tasks = await jetstream.job_task_count(js, pipeline, uid)
            out["consumer"] = tasks > 0 or await job_consumers(js, pipeline, uid) != []
            try:
                kv = await js.key_value(protocol.REGISTRY_BUCKET)
                await kv.get(protocol.registry_key(pipeline, uid))
            except (KeyNotFoundError, NotFoundError):
                out["registry"] = False
            await nc.close()
            return out

        return asyncio.run(check())


async def job_consumers(js: Any, pipeline: str, uid: str) -> list[str]:
    """The names of every consumer of the job on its pipeline's stream, replaced ones included."""
    from nats.js.errors import NotFoundError

    from mljob import protocol

    names: list[str] = []
    while True:
        try:
            page = await js.consumers_info(protocol.task_stream(pipeline), len(names))
        except NotFoundError:
            return []
        if not page:
            break
        names.extend(str(c.name) for c in page)
    return [n for n in names if (protocol.parse_task_consumer(n) or ("", 0))[0] == uid]


def make_e2e(stack: Any, kubectl: Any, tmp_dir: Path) -> Iterator[E2E]:
    suffix = uuid.uuid4().hex[:8]
    namespace = f"e2e-{suffix}"
    kubectl.run("create", "namespace", namespace)
    env = E2E(
        stack=stack,
        kubectl=kubectl,
        namespace=namespace,
        schema=f"e2e_{suffix}",
        prefix=f"e2e{suffix}",
        log_dir=tmp_dir,
    )
    try:
        yield env
    finally:
        env.stop_all()
        with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{env.schema}" CASCADE'.encode())


def apiserver_status_patches(kubectl: Any) -> int:
    """Total MLJob status writes the apiserver has served (from its own metrics)."""
    text = kubectl.run("get", "--raw", "/metrics").stdout
    total = 0
    for line in text.splitlines():
        if (
            line.startswith("apiserver_request_total{")
            and 'resource="mljobs"' in line
            and 'subresource="status"' in line
            and ('verb="PATCH"' in line or 'verb="PUT"' in line)
        ):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def job_tasks(stack: Any, pipeline: str, uid: str) -> int:
    """How many task messages of the job its pipeline's stream holds."""
    from mljob.adapters import jetstream

    async def read() -> int:
        nc = await stack.nats()
        try:
            return await jetstream.job_task_count(nc.jetstream(), pipeline, uid)
        finally:
            await nc.close()

    return asyncio.run(read())


def configmap_manifests(name: str, ids: list[str], per_map: int = 10_000) -> tuple[list[str], str]:
    """ConfigMaps holding `ids` one per line, split to stay far below the 1 MiB object limit."""
    names, docs = [], []
    for index in range(0, len(ids), per_map):
        cm = f"{name}-{index // per_map}"
        names.append(cm)
        chunk = "\n".join(ids[index : index + per_map]) + "\n"
        meta = {"name": cm}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"ids": chunk}})
    return names, json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
