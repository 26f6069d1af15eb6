"""The chart's pods on a real node: `helm install` with the image built from the Dockerfile, as a
platform engineer's first install runs it. The operator pod's readiness follows its stores, an
MLJob applied with kubectl runs to Succeeded through the chart's worker Deployment and external
collector, `helm upgrade` replaces the operator pod (Recreate) mid-job and the job still ends
exact, the pods run as 10001 on a read-only root, and `kubectl logs` shows JSON lines naming the job.

One release for the module, the tests in the order a user meets them. Pods use the host's
network (`hostNetwork`): the stack's stores listen on the host's loopback only. The operator's
in-cluster client is pointed at the apiserver on loopback (KUBERNETES_SERVICE_HOST/PORT): the
node has no kube-proxy to route the `kubernetes` Service's cluster IP.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from mljob_dev.devstack import image
from mljob_dev.devstack import stack as devstack
from mljob_dev.devstack.restart import stop_one
from mljob_dev.devstack.stack import free_port
from support.chart import CHART, helm, set_args
from support.harness import mljob_manifest
from support.probe import write_probe
from support.stack import Kubectl, StackEnv
from support.waiting import wait_for

pytestmark = pytest.mark.node

PIPELINE = "smoke"
HANDLER = "mljob.worker.examples:echo"


@dataclass
class Release:
    name: str
    namespace: str
    values: dict[str, Any]
    kubectl: Kubectl
    kubeconfig: str

    @property
    def fullname(self) -> str:
        return f"{self.name}-mljob-operator"

    def pods(self, component: str) -> list[dict[str, Any]]:
        out = self.kubectl.json(
            "-n", self.namespace, "get", "pods", "-l", f"app.kubernetes.io/component={component}"
        )
        return list(out["items"])

    def ready_pod(self, component: str, timeout: float = 180) -> dict[str, Any]:
        """The one pod of `component` once it is Ready (with its state and logs if it never is)."""

        def ready() -> dict[str, Any] | None:
            pods = [p for p in self.pods(component) if not p["metadata"].get("deletionTimestamp")]
            return pods[0] if len(pods) == 1 and is_ready(pods[0]) else None

        try:
            pod: dict[str, Any] = wait_for(ready, timeout, what=f"the {component} pod to be Ready")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.describe(component)}") from err
        return pod

    def describe(self, component: str) -> str:
        selector = f"app.kubernetes.io/component={component}"
        pods = self.kubectl.run("-n", self.namespace, "describe", "pods", "-l", selector, check=False)
        logs = self.kubectl.run("-n", self.namespace, "logs", "-l", selector, "--tail=40", check=False)
        return f"{pods.stdout[-6000:]}\nlogs:\n{logs.stdout[-4000:]}{logs.stderr[-1000:]}"

    def upgrade(self, **changes: Any) -> None:
        self.values = {**self.values, **changes}
        helm(
            "upgrade",
            self.name,
            str(CHART),
            "-n",
            self.namespace,
            *set_args(self.values),
            kubeconfig=self.kubeconfig,
        )

    def outlived_liveness(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The pod again, once it has run three times as long as its liveness probe takes to
        restart a container that fails it (a young pod's restart count proves nothing)."""
        probe = self.values["probes"]["liveness"]
        window = probe["initialDelaySeconds"] + probe["periodSeconds"] * probe["failureThreshold"]
        started = datetime.fromisoformat(pod["status"]["startTime"].replace("Z", "+00:00"))
        age = (datetime.now(UTC) - started).total_seconds()
        time.sleep(max(0.0, 3 * window - age))
        name = pod["metadata"]["name"]
        return dict(self.kubectl.json("-n", self.namespace, "get", "pod", name))

    def logs(self, pod: dict[str, Any]) -> list[str]:
        out = self.kubectl.run("-n", self.namespace, "logs", pod["metadata"]["name"]).stdout
        return [line for line in out.splitlines() if line.strip()]

    def exec(self, pod: dict[str, Any], *cmd: str) -> str:
        return self.kubectl.run("-n", self.namespace, "exec", pod["metadata"]["name"], "--", *cmd).stdout

    def apply_job(self, name: str, items: list[str], **spec: Any) -> str:
        manifest = mljob_manifest(name, PIPELINE, items, **spec)
        self.kubectl.run("-n", self.namespace, "apply", "-f", "-", stdin=manifest)
        return str(self.job(name)["metadata"]["uid"])

    def job(self, name: str) -> dict[str, Any]:
        return dict(self.kubectl.json("-n", self.namespace, "get", "mljob", name))

    def wait_phase(self, name: str, phase: str, timeout: float = 180) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.job(name).get("status") or {}
            return status if status.get("phase") == phase else None

        try:
            status: dict[str, Any] = wait_for(reached, timeout, what=f"{name} to be {phase}")
        except AssertionError as err:
            status_now = json.dumps(self.job(name).get("status"))
            raise AssertionError(f"{err}; status={status_now}\n{self.describe('operator')}") from err
        return status


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return conditions.get("Ready") == "True"


def _secret(kubectl: Kubectl, namespace: str, name: str, **data: str) -> None:
    literals = [f"--from-literal={key}={value}" for key, value in data.items()]
    kubectl.run("-n", namespace, "create", "secret", "generic", name, *literals)


def _user(secret: str) -> dict[str, Any]:
    return {"userSecret": {"name": secret, "userKey": "user", "passwordKey": "password"}}


def release_values(env: dict[str, str], prefix: str) -> dict[str, Any]:
    """Values for the node: the built image (never pulled), the host's network with free ports,
    the stack's stores with a NATS identity per role from Secrets, and one worker Deployment."""
    apiserver = urlsplit(env["MLJOB_KUBE_SERVER"])
    return {
        "image": {"repository": image.IMAGE.rsplit(":", 1)[0], "tag": "dev", "pullPolicy": "Never"},
        "hostNetwork": True,
        "ports": {"health": free_port(), "metrics": free_port()},
        "collector": {"enabled": True, "metricsPort": free_port()},
        "nats": {
            "url": env["MLJOB_NATS_URL"],
            "tls": {"caSecret": {"name": "mljob-nats-ca", "key": "ca.crt"}},
            "credentials": {
                "operator": _user("nats-operator"),
                "collector": _user("nats-collector"),
                "workers": _user("nats-worker"),
            },
        },
        "redis": {"url": env["MLJOB_REDIS_URL"], "prefix": prefix},
        "postgres": {"dsn": env["MLJOB_POSTGRES_DSN"]},
        "operator": {
            "reconcileIntervalSeconds": 1,
            "extraEnv": [
                {"name": "KUBERNETES_SERVICE_HOST", "value": apiserver.hostname},
                {"name": "KUBERNETES_SERVICE_PORT", "value": str(apiserver.port)},
            ],
        },
        # Probes this fast show a broken endpoint within seconds (restarts, readiness).
        "probes": {
            "readiness": {"periodSeconds": 2, "failureThreshold": 1},
            "liveness": {"initialDelaySeconds": 5, "periodSeconds": 2, "failureThreshold": 3},
        },
        "workers": [{"pipeline": PIPELINE, "handler": HANDLER, "replicas": 1, "concurrency": 4}],
    }


@pytest.fixture(scope="module")
def release(
    node_stack: devstack.Stack, stack: StackEnv, kubectl: Kubectl, built_image: str
) -> Iterator[Release]:
    env = node_stack.env
    namespace = f"mljob-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", namespace)
    ca = Path(env["MLJOB_NATS_TLS_CA_FILE"]).read_text()
    kubectl.run(
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "mljob-nats-ca",
        f"--from-file=ca.crt={env['MLJOB_NATS_TLS_CA_FILE']}",
    )
    assert ca
    _secret(
        kubectl, namespace, "nats-operator", user=env["MLJOB_NATS_USER"], password=env["MLJOB_NATS_PASSWORD"]
    )
    for role in ("collector", "worker"):
        _secret(
            kubectl,
            namespace,
            f"nats-{role}",
            user=env[f"MLJOB_DEV_NATS_{role.upper()}_USER"],
            password=env[f"MLJOB_DEV_NATS_{role.upper()}_PASSWORD"],
        )
    name = "mljob"
    values = release_values(env, prefix=f"node-{uuid.uuid4().hex[:6]}")
    out = helm("install", name, str(CHART), "-n", namespace, *set_args(values), kubeconfig=stack.kubeconfig)
    assert "STATUS: deployed" in out.stdout
    yield Release(name, namespace, values, kubectl, stack.kubeconfig)
    helm("uninstall", name, "-n", namespace, "--wait", kubeconfig=stack.kubeconfig, check=False)


def test_the_operator_pod_is_ready_and_its_readiness_follows_redis(
    release: Release, node_stack: devstack.Stack
) -> None:
    pod = release.ready_pod("operator")
    assert pod["spec"]["hostNetwork"] is True
    assert pod["spec"]["containers"][0]["image"] == image.IMAGE
    release.ready_pod("collector")
    release.ready_pod(f"worker-{PIPELINE}")

    running = devstack.Stack.load(node_stack.directory)
    port = urlsplit(running.env["MLJOB_REDIS_URL"]).port
    stop_one(running, "redis-server")
    try:
        wait_for(
            lambda: not is_ready(release.pods("operator")[0]),
            60,
            what="the operator pod to turn unready while Redis is down",
        )
        assert len(release.pods("operator")) == 1, "readiness, not liveness: the pod is not replaced"
    finally:
        running.start_redis(port)
        running.save()
    again = release.ready_pod("operator", timeout=60)
    assert again["metadata"]["uid"] == pod["metadata"]["uid"]


def _results(dsn: str, uid: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT item_id, outcome FROM mljob_results WHERE job_uid = %s", (uid,))
        return {item: outcome for item, outcome in rows.fetchall()}


def test_an_mljob_applied_with_kubectl_succeeds_through_the_chart_workers(
    release: Release, node_stack: devstack.Stack
) -> None:
    release.ready_pod("operator")
    items = [f"img-{i:04d}.jpg" for i in range(50)]
    uid = release.apply_job("smoke-1", items)
    status = release.wait_phase("smoke-1", "Succeeded")
    assert (status["total"], status["processed"], status.get("failed", 0)) == (len(items), len(items), 0)
    assert _results(node_stack.env["MLJOB_POSTGRES_DSN"], uid) == dict.fromkeys(items, "succeeded")
    listed = release.kubectl.run("-n", release.namespace, "get", "mljobs").stdout
    assert "smoke-1" in listed and "Succeeded" in listed

    # `kubectl logs`: one JSON object per line, and the job's own lines name it.
    lines = release.logs(release.ready_pod("operator"))
    records = [json.loads(line) for line in lines]
    mine = [r for r in records if r.get("uid") == uid]
    assert mine, lines[-20:]
    assert all(r["job"] == f"{release.namespace}/smoke-1" for r in mine)
    worker = release.logs(release.ready_pod(f"worker-{PIPELINE}"))
    assert worker and all(isinstance(json.loads(line), dict) for line in worker)


def test_helm_upgrade_replaces_the_operator_pod_mid_job_and_the_job_ends_exact(
    release: Release, node_stack: devstack.Stack
) -> None:
    old = release.ready_pod("operator")
    items = [f"slow-{i:04d}.jpg" for i in range(240)]
    # 240 items at 0.25 s on 4 worker slots: about 15 s of work, so the upgrade lands mid-job.
    uid = release.apply_job("upgraded", items, params={"echoDelaySeconds": 0.25})

    def started() -> dict[str, Any] | None:
        status = release.job("upgraded").get("status") or {}
        done = status.get("processed", 0)
        return status if status.get("phase") == "Running" and done > 0 else None

    before = wait_for(started, 60, what="the job to be Running with results")
    assert before["processed"] < len(items) / 2, before

    release.upgrade(operator={**release.values["operator"], "podAnnotations": {"upgrade": "1"}})
    overlap, seen = [], set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pods = [p for p in release.pods("operator") if p["status"].get("phase") in {"Pending", "Running"}]
        running = [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"]
        seen.update(p["metadata"]["name"] for p in pods)
        if len(running) > 1:
            overlap.append(running)
        if any(p["metadata"]["uid"] != old["metadata"]["uid"] and is_ready(p) for p in pods):
            break
        time.sleep(0.3)
    new = release.ready_pod("operator")
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    assert new["metadata"]["annotations"]["upgrade"] == "1"
    assert overlap == [], f"Recreate: the new operator pod ran beside the old one: {overlap}"
    mid = release.job("upgraded")["status"]
    assert mid["phase"] == "Running", "the job was still running when the new operator took over"

    status = release.wait_phase("upgraded", "Succeeded", timeout=240)
    assert (status["total"], status["processed"], status.get("failed", 0)) == (len(items), len(items), 0)
    assert _results(node_stack.env["MLJOB_POSTGRES_DSN"], uid) == dict.fromkeys(items, "succeeded")


def test_the_pods_run_as_10001_on_a_read_only_root_and_were_never_restarted(release: Release) -> None:
    token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    probe = write_probe({"root": "/x", "tmp": "/tmp/x"}, exists={"token": token_file})
    expected = {"uid": 10001, "gid": 10001, "root": "Read-only file system", "tmp": "wrote"}
    for component, token in (("operator", True), ("collector", False), (f"worker-{PIPELINE}", False)):
        pod = release.ready_pod(component)
        seen = json.loads(release.exec(pod, "python", "-c", probe).strip().splitlines()[-1])
        assert seen == {**expected, "token": token}, component
        # Liveness (kopf's endpoint on the operator, the metrics port on the others) holds: once
        # the pod has lived through several failure windows, its container was never restarted.
        pod = release.outlived_liveness(pod)
        restarts = [s["restartCount"] for s in pod["status"]["containerStatuses"]]
        assert restarts == [0], f"{component}: {restarts}\n{release.describe(component)}"
