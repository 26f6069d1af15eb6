"""The Helm chart: lint, what renders for the main value combinations, what the schema refuses,
and that the rendered objects are accepted by the real apiserver (dry run, install, upgrade)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException

from support.chart import (
    CHART,
    FOREIGN_CRDS,
    container,
    docs,
    env_of,
    find,
    helm,
    one,
    render,
    schema_refusal,
    set_args,
)
from support.stack import Kubectl
from support.waiting import wait_for

OPERATOR_RULES = [
    {
        "apiGroups": ["mljob.dev"],
        "resources": ["mljobs"],
        "verbs": ["get", "list", "watch", "patch", "delete"],
    },
    {"apiGroups": ["mljob.dev"], "resources": ["mljobs/status"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
CRD_WATCH = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}

SECRETS: dict[str, Any] = {
    "nats": {
        "url": "",
        "existingSecret": {"name": "mljob-conn", "key": "nats"},
        "tls": {"caSecret": {"name": "mljob-ca", "key": "ca.crt"}},
    },
    "redis": {"url": "", "existingSecret": {"name": "mljob-conn", "key": "redis"}},
    "postgres": {
        "dsn": "",
        "existingSecret": {"name": "mljob-conn", "key": "postgres"},
        "tls": {"caSecret": {"name": "mljob-ca", "key": "ca.crt"}, "sslMode": "verify-full"},
    },
}
MONITORING: dict[str, Any] = {
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    },
}
WORKERS: dict[str, Any] = {
    "workers": [
        {"pipeline": "thumbs", "handler": "mypkg.handlers:thumb", "replicas": 3},
        {
            "pipeline": "ocr",
            "handler": "ocrpkg.run:page",
            "image": "registry.invalid/ocr:1.2.3",
            "concurrency": 4,
            "keda": {"enabled": True, "minReplicaCount": 0, "maxReplicaCount": 12, "threshold": 50},
        },
    ]
}

#: Value combinations the chart must render, dry-run and install: (name, values, extra helm flags).
COMBINATIONS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("defaults", {}, ()),
    ("collector", {"collector": {"enabled": True, "replicas": 2}}, ()),
    ("namespaces", {"watchNamespaces": ["@ns-a", "@ns-b"]}, ()),
    ("ha", {"ha": {"enabled": True, "replicas": 3}}, ()),
    ("ha-namespaces", {"ha": {"enabled": True}, "watchNamespaces": ["@ns-a"]}, ()),
    ("secrets", SECRETS, ()),
    ("monitoring", MONITORING, ()),
    ("workers", WORKERS, ()),
]


def operator_deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment", "rel-mljob-operator")


# ---------------------------------------------------------------------------------- lint, render


def test_helm_lint_passes_for_every_combination() -> None:
    helm("lint", "--strict", str(CHART))
    for name, values, _extra in COMBINATIONS:
        values = json.loads(json.dumps(values).replace("@ns-", "ns-"))
        proc = helm("lint", "--strict", str(CHART), *set_args(values), check=False)
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"


def test_defaults_render_one_hardened_recreate_operator_with_a_cluster_role() -> None:
    objs = docs(render())
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Service",
            "Deployment",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
    )
    deploy = operator_deployment(objs)
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "rel-mljob-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(deploy)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert c["args"] == ["operator", "--liveness=http://0.0.0.0:8080/healthz"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    env = env_of(deploy)
    assert env["MLJOB_NATS_URL"] == "nats://nats:4222"
    assert env["MLJOB_REDIS_URL"] == "redis://redis:6379/0"
    assert env["MLJOB_POSTGRES_DSN"] == "postgresql://mljob@postgres:5432/mljob"
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert c["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}

    role = one(objs, "ClusterRole")
    assert role["rules"] == [*OPERATOR_RULES, CRD_WATCH]
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == "mljob-rel-mljob-operator"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-mljob-operator", "namespace": "mljob"}
    ]

    service = one(objs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "operator"


def test_ports_and_probe_paths_are_values() -> None:
    objs = docs(
        render({"ports": {"health": 18080, "metrics": 19090}, "probes": {"liveness": {"path": "/live"}}})
    )
    c = container(operator_deployment(objs))
    assert "--liveness=http://0.0.0.0:18080/live" in c["args"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 18080, "metrics": 19090}
    assert c["livenessProbe"]["httpGet"]["path"] == "/live"
    assert one(objs, "Service")["spec"]["ports"][0]["port"] == 19090


def test_every_pod_logs_json_by_default_and_text_when_asked() -> None:
    values = {**WORKERS, "collector": {"enabled": True}}
    for fmt, asked in (("json", {}), ("text", {"logFormat": "text"})):
        deployments = find(docs(render({**values, **asked})), "Deployment")
        assert len(deployments) == 4  # the operator, the collector, two pipelines' workers
        assert {env_of(d)["MLJOB_LOG_FORMAT"] for d in deployments} == {fmt}


def test_host_network_puts_every_pod_on_the_node_network_with_its_own_ports() -> None:
    values = {**WORKERS, "collector": {"enabled": True, "metricsPort": 19191}, "hostNetwork": True}
    objs = docs(render(values))
    deployments = find(objs, "Deployment")
    for deploy in deployments:
        pod = deploy["spec"]["template"]["spec"]
        assert pod["hostNetwork"] is True, deploy["metadata"]["name"]
        assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"  # cluster DNS still resolves
    collector = one(objs, "Deployment", "rel-mljob-operator-collector")
    assert {p["name"]: p["containerPort"] for p in container(collector)["ports"]} == {"metrics": 19191}
    assert env_of(collector)["MLJOB_METRICS_PORT"] == "19191"
    assert {p["name"]: p["containerPort"] for p in container(operator_deployment(objs))["ports"]} == {
        "health": 8080,
        "metrics": 9090,
    }
    for deploy in find(docs(render(WORKERS)), "Deployment"):
        assert "hostNetwork" not in deploy["spec"]["template"]["spec"]


def test_admission_policy_can_be_left_to_another_release() -> None:
    objs = docs(render({"admissionPolicy": {"enabled": False}}))
    assert not find(objs, "ValidatingAdmissionPolicy") and not find(objs, "ValidatingAdmissionPolicyBinding")


def test_collector_enabled_runs_it_separately_and_the_operator_without_it() -> None:
    objs = docs(render({"collector": {"enabled": True, "replicas": 2}}))
    assert "--no-collector" in container(operator_deployment(objs))["args"]
    collector = one(objs, "Deployment", "rel-mljob-operator-collector")
    assert collector["spec"]["replicas"] == 2
    assert container(collector)["args"][0] == "collector"
    assert collector["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert container(collector)["securityContext"]["readOnlyRootFilesystem"] is True
    assert env_of(collector)["MLJOB_POSTGRES_DSN"] == "postgresql://mljob@postgres:5432/mljob"
    services = {s["metadata"]["name"] for s in find(objs, "Service")}
    assert services == {"rel-mljob-operator-operator-metrics", "rel-mljob-operator-collector-metrics"}


def test_watch_namespaces_grant_roles_there_and_pass_namespace_flags() -> None:
    objs = docs(render({"watchNamespaces": ["team-a", "team-b"]}))
    args = container(operator_deployment(objs))["args"]
    assert args[:3] == ["operator", "--namespace=team-a", "--namespace=team-b"]
    roles = find(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == OPERATOR_RULES for r in roles)
    bindings = find(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"][0]["namespace"] == "mljob" for b in bindings)
    # Nothing about MLJobs cluster-wide: only kopf's read-only observation of namespaces and CRDs.
    (observe,) = find(objs, "ClusterRole")
    assert observe["rules"] == [
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
        CRD_WATCH,
    ]
    strict = docs(render({"watchNamespaces": ["team-a"], "rbac": {"kopfObservation": False}}))
    assert not find(strict, "ClusterRole") and not find(strict, "ClusterRoleBinding")


LEASE_RULES = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": ["rel-mljob-operator"],
        "verbs": ["get", "update"],
    },
]


def test_ha_elects_a_leader_on_a_lease_of_its_own_with_a_pdb_and_no_kopf_peering() -> None:
    for values in (
        {"ha": {"enabled": True, "replicas": 3}},
        {"ha": {"enabled": True}, "watchNamespaces": ["team-a"]},
    ):
        objs = docs(render(values))
        deploy = operator_deployment(objs)
        assert deploy["spec"]["replicas"] == values["ha"].get("replicas", 2)
        assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
        args = container(deploy)["args"]
        assert "--leader-elect" in args and "--peering" not in args
        env = env_of(deploy)
        assert env["MLJOB_LEASE_NAME"] == "rel-mljob-operator"
        assert env["MLJOB_LEASE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
        # The Lease's Role is in the release namespace, whatever namespaces are watched.
        role = one(objs, "Role", "rel-mljob-operator-leader")
        assert role["metadata"]["namespace"] == "mljob"
        assert role["rules"] == LEASE_RULES
        binding = one(objs, "RoleBinding", "rel-mljob-operator-leader")
        assert binding["roleRef"]["name"] == "rel-mljob-operator-leader"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "rel-mljob-operator", "namespace": "mljob"}
        ]
        # No kopf peering left: no peering objects, no kopf.dev grants.
        assert not [o for o in objs if o["apiVersion"].startswith("kopf.dev")]
        rules = [r for o in objs if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]
        assert not [r for r in rules if "kopf.dev" in r["apiGroups"]]

    single = docs(render())
    assert not find(single, "PodDisruptionBudget")
    assert not find(single, "Role", "rel-mljob-operator-leader")
    assert "--leader-elect" not in container(operator_deployment(single))["args"]


def test_existing_secrets_and_tls_cas_are_referenced_not_copied() -> None:
    objs = docs(render({**SECRETS, "collector": {"enabled": True}}))
    for deploy in find(objs, "Deployment"):
        env = env_of(deploy)
        assert env["MLJOB_NATS_URL"] == {"secretKeyRef": {"name": "mljob-conn", "key": "nats"}}
        assert env["MLJOB_REDIS_URL"] == {"secretKeyRef": {"name": "mljob-conn", "key": "redis"}}
        assert env["MLJOB_POSTGRES_DSN"] == {"secretKeyRef": {"name": "mljob-conn", "key": "postgres"}}
        assert env["MLJOB_NATS_TLS_CA_FILE"] == "/etc/mljob/tls/nats/ca.crt"
        assert env["MLJOB_POSTGRES_TLS_CA_FILE"] == env["PGSSLROOTCERT"] == "/etc/mljob/tls/postgres/ca.crt"
        assert env["PGSSLMODE"] == "verify-full"
        assert "MLJOB_REDIS_TLS_CA_FILE" not in env
        mounts = {m["name"]: m["mountPath"] for m in container(deploy)["volumeMounts"]}
        assert mounts == {
            "tmp": "/tmp",
            "tls-nats": "/etc/mljob/tls/nats",
            "tls-postgres": "/etc/mljob/tls/postgres",
        }
        volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls-nats"]["secret"] == {
            "secretName": "mljob-ca",
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        }
    assert "nats://" not in render(SECRETS)


def test_monitoring_renders_service_monitor_alerts_and_network_policy() -> None:
    objs = docs(render(MONITORING))
    monitor = one(objs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"]["mljob.dev/metrics"] == "true"
    assert one(objs, "Service")["metadata"]["labels"]["mljob.dev/metrics"] == "true"

    rules = one(objs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules}
    assert set(alerts) == {
        "MLJobOperatorDown",
        "MLJobStalled",
        "MLJobPipelineBacklogWithoutProgress",
        "MLJobItemsExhaustDeliveries",
        "MLJobFailures",
        "MLJobCollectorLagging",
        "MLJobOrphansFound",
    }
    assert "up{" in alerts["MLJobOperatorDown"]["expr"]
    assert 'reason="MaxDeliveriesExceeded"' in alerts["MLJobItemsExhaustDeliveries"]["expr"]
    assert "mljob_items_failed_total" in alerts["MLJobItemsExhaustDeliveries"]["expr"]
    assert 'phase="Running"' in alerts["MLJobStalled"]["expr"]
    assert "mljob_items_processed_total" in alerts["MLJobStalled"]["expr"]
    assert "mljob_backlog" in alerts["MLJobPipelineBacklogWithoutProgress"]["expr"]
    assert "mljob_collector_lag_seconds" in alerts["MLJobCollectorLagging"]["expr"]
    assert "mljob_orphans_removed_total" in alerts["MLJobOrphansFound"]["expr"]
    assert 'namespace="mljob"' in alerts["MLJobStalled"]["expr"]
    assert alerts["MLJobPipelineBacklogWithoutProgress"]["annotations"]["summary"].startswith(
        "pipeline {{ $labels.pipeline }}"
    )
    assert all(r["labels"]["severity"] in {"critical", "warning", "info"} for r in rules)

    policy = one(objs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert policy["spec"]["ingress"][0]["from"] == MONITORING["networkPolicy"]["metricsFrom"]


def test_workers_render_a_deployment_per_pipeline_and_keda_scales_on_its_backlog() -> None:
    objs = docs(render(WORKERS))
    thumbs = one(objs, "Deployment", "rel-mljob-operator-worker-thumbs")
    assert thumbs["spec"]["replicas"] == 3
    c = container(thumbs)
    assert c["image"] == "mljob-operator:0.1.0"
    assert c["args"][:3] == ["worker", "--pipeline=thumbs", "--handler=mypkg.handlers:thumb"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert thumbs["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    env = env_of(thumbs)
    assert env["MLJOB_NATS_URL"] == "nats://nats:4222"
    assert "MLJOB_POSTGRES_DSN" not in env and "MLJOB_REDIS_URL" not in env

    ocr = one(objs, "Deployment", "rel-mljob-operator-worker-ocr")
    assert "replicas" not in ocr["spec"], "KEDA owns the replica count"
    assert container(ocr)["image"] == "registry.invalid/ocr:1.2.3"
    assert "--concurrency=4" in container(ocr)["args"]
    scaled = one(objs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == {"name": "rel-mljob-operator-worker-ocr"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 12)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert 'mljob_backlog{pipeline="ocr"}' in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == "50"
    assert trigger["metadata"]["serverAddress"].startswith("http://")


def test_notes_say_how_to_check_and_how_to_upgrade_crds() -> None:
    notes = helm("template", "rel", str(CHART), "--show-only", "templates/NOTES.txt", check=False)
    text = notes.stdout + notes.stderr
    if notes.returncode != 0:  # helm renders NOTES only on install; read the template instead
        text = (CHART / "templates" / "NOTES.txt").read_text()
    assert "kubectl get mljobs" in text
    assert "kubectl apply --server-side -f crds/" in text


# ---------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ha": {"enabled": True, "replicas": 1}}, "at '/ha/replicas': minimum: got 1, want 2"),
        ({"operator": {"logLevel": "LOUD"}}, "at '/operator/logLevel': value must be one of"),
        ({"nats": {"url": "http://nats:4222"}}, "at '/nats/url': 'http://nats:4222' does not match pattern"),
        ({"nats": {"url": "", "existingSecret": {"name": "", "key": "url"}}}, "at '/nats': 'anyOf' failed"),
        (
            {"postgres": {"existingSecret": {"name": "pg", "key": ""}}},
            "at '/postgres/existingSecret/key': minLength",
        ),
        (
            {"redis": {"existingSecret": {"name": "rd", "key": None}}},
            "at '/redis/existingSecret': missing property 'key'",
        ),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0': 'Team_A' does not match pattern"),
        (
            {"workers": [{"pipeline": "a.b", "handler": "m:f"}]},
            "at '/workers/0/pipeline': 'a.b' does not match",
        ),
        ({"workers": [{"pipeline": "ocr"}]}, "missing property 'handler'"),
        ({"ports": {"metrics": 70000}}, "at '/ports/metrics': maximum: got 70,000, want 65,535"),
        ({"collector": {"replicas": "two"}}, "at '/collector/replicas': got string, want integer"),
        ({"securityContext": {"runAsNonRoot": False}}, "at '/securityContext/runAsNonRoot'"),
        ({"colector": {"enabled": True}}, "additional properties 'colector' not allowed"),
        ({"logFormat": "xml"}, "at '/logFormat': value must be one of 'json', 'text'"),
        ({"hostNetwork": "yes"}, "at '/hostNetwork': got string, want boolean"),
    ],
)
def test_schema_refuses_wrong_values_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    stderr = schema_refusal(values)
    assert message in stderr, stderr


def test_schema_accepts_a_secret_instead_of_a_plain_value() -> None:
    render({"postgres": {"dsn": "", "existingSecret": {"name": "pg", "key": "dsn"}}})


# ---------------------------------------------------------------------------------- real apiserver


@pytest.fixture(scope="module")
def foreign_crds(kubectl: Kubectl, crd_installed: None) -> None:
    """Minimal CRDs of Prometheus Operator and KEDA, so their objects can be dry-run and
    installed on a stack that runs neither."""
    kubectl.run(
        "apply",
        "--server-side",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": FOREIGN_CRDS}),
    )
    for crd in [c["metadata"]["name"] for c in FOREIGN_CRDS]:
        kubectl.run("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")
    wait_for(
        lambda: all(
            kubectl.run("get", kind, "-A", check=False).returncode == 0
            for kind in ("servicemonitors", "prometheusrules", "scaledobjects")
        ),
        30,
        what="the stand-in CRDs to become servable",
    )


def _with_namespaces(values: dict[str, Any], suffix: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(values).replace("@ns-", f"ns-{suffix}-"))
    return loaded


@pytest.mark.parametrize(("name", "values", "extra"), COMBINATIONS, ids=[c[0] for c in COMBINATIONS])
def test_rendered_manifests_pass_a_server_side_dry_run(
    kubectl: Kubectl,
    foreign_crds: None,
    namespace: str,
    name: str,
    values: dict[str, Any],
    extra: tuple[str, ...],
) -> None:
    suffix = uuid.uuid4().hex[:6]
    values = _with_namespaces(values, suffix)
    for ns in values.get("watchNamespaces", []):
        kubectl.run("create", "namespace", ns)
    manifest = render(values, *extra, namespace=namespace)
    # Every namespaced object names its namespace (the watched ones are not the release one).
    proc = kubectl.run("apply", "--dry-run=server", "-f", "-", stdin=manifest, check=False)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout}\n{proc.stderr}"
    applied = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(docs(manifest)), proc.stdout


@pytest.fixture
def release(stack: Any, kubectl: Kubectl, foreign_crds: None, namespace: str) -> Iterator[tuple[str, str]]:
    """A release name in a fresh namespace; uninstalled afterwards (its cluster-scoped objects too)."""
    name = f"r{uuid.uuid4().hex[:6]}"
    yield name, namespace
    helm("uninstall", name, "-n", namespace, kubeconfig=stack.kubeconfig, check=False)


# The stack's MLJob admission policy was applied from crds/ (not by Helm): leave it alone.
INSTALL_BASE = {"admissionPolicy": {"enabled": False}}


def test_helm_install_then_upgrade_into_the_test_apiserver(
    stack: Any, kubectl: Kubectl, release: tuple[str, str]
) -> None:
    name, namespace = release
    fullname = f"{name}-mljob-operator"
    out = helm(
        "install",
        name,
        str(CHART),
        "-n",
        namespace,
        *set_args({**INSTALL_BASE, **MONITORING, **WORKERS}),
        kubeconfig=stack.kubeconfig,
    ).stdout
    assert "STATUS: deployed" in out
    assert "kubectl get mljobs" in out  # NOTES.txt

    deploy = kubectl.json("-n", namespace, "get", "deployment", fullname)
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    assert deploy["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] == 10001
    kubectl.run("-n", namespace, "get", "serviceaccount", fullname)
    kubectl.run("-n", namespace, "get", "service", f"{fullname}-operator-metrics")
    kubectl.run("-n", namespace, "get", "servicemonitor", fullname)
    kubectl.run("-n", namespace, "get", "prometheusrule", fullname)
    kubectl.run("-n", namespace, "get", "networkpolicy", fullname)
    kubectl.run("-n", namespace, "get", "scaledobject", f"{fullname}-worker-ocr")
    kubectl.run("-n", namespace, "get", "deployment", f"{fullname}-worker-thumbs")
    role = kubectl.json("get", "clusterrole", f"{namespace}-{fullname}")
    assert role["rules"][: len(OPERATOR_RULES)] == OPERATOR_RULES
    # The ServiceAccount can do exactly what the role says, checked by the apiserver itself.
    sa = f"system:serviceaccount:{namespace}:{fullname}"
    assert (
        kubectl.run(
            "auth", "can-i", "patch", "mljobs.mljob.dev", "--subresource=status", "--as", sa, "-A"
        ).stdout.strip()
        == "yes"
    )
    assert (
        kubectl.run(
            "auth", "can-i", "create", "mljobs.mljob.dev", "--as", sa, "-n", namespace, check=False
        ).stdout.strip()
        == "no"
    )
    assert (
        kubectl.run(
            "auth", "can-i", "list", "secrets", "--as", sa, "-n", namespace, check=False
        ).stdout.strip()
        == "no"
    )

    helm(
        "upgrade",
        name,
        str(CHART),
        "-n",
        namespace,
        *set_args(
            {
                **INSTALL_BASE,
                **MONITORING,
                **WORKERS,
                "collector": {"enabled": True},
                "watchNamespaces": [namespace],
            }
        ),
        kubeconfig=stack.kubeconfig,
    )
    status = json.loads(
        helm("status", name, "-n", namespace, "-o", "json", kubeconfig=stack.kubeconfig).stdout
    )
    assert (status["info"]["status"], status["version"]) == ("deployed", 2)
    collector = kubectl.json("-n", namespace, "get", "deployment", f"{fullname}-collector")
    assert collector["spec"]["template"]["spec"]["containers"][0]["args"][0] == "collector"
    args = kubectl.json("-n", namespace, "get", "deployment", fullname)["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--no-collector" in args and f"--namespace={namespace}" in args
    # The cluster-wide grant is gone; a Role in the watched namespace replaced it.
    assert kubectl.run("get", "clusterrole", f"{namespace}-{fullname}", check=False).returncode != 0
    assert kubectl.json("-n", namespace, "get", "role", fullname)["rules"] == OPERATOR_RULES
    assert (
        kubectl.run(
            "auth", "can-i", "list", "mljobs.mljob.dev", "--as", sa, "-n", "default", check=False
        ).stdout.strip()
        == "no"
    )
    assert (
        kubectl.run("auth", "can-i", "list", "mljobs.mljob.dev", "--as", sa, "-n", namespace).stdout.strip()
        == "yes"
    )


async def test_helm_install_with_ha_lets_the_service_account_hold_its_lease_and_no_other(
    stack: Any, kubectl: Kubectl, release: tuple[str, str]
) -> None:
    """On a token of the chart's ServiceAccount (not the admin certificate): the Lease the
    operator is told to use can be created, read and renewed; another Lease cannot."""
    from datetime import UTC, datetime

    from kubernetes import config as kube_config

    from mljob.adapters.kube import Kube
    from mljob.core.leases import LeaseRecord

    name, namespace = release
    fullname = f"{name}-mljob-operator"
    helm(
        "install",
        name,
        str(CHART),
        "-n",
        namespace,
        *set_args({**INSTALL_BASE, "ha": {"enabled": True}, "watchNamespaces": [namespace]}),
        kubeconfig=stack.kubeconfig,
    )
    kubectl.run("-n", namespace, "get", "poddisruptionbudget", fullname)
    deploy = kubectl.json("-n", namespace, "get", "deployment", fullname)
    assert deploy["spec"]["replicas"] == 2
    lease_name = next(e["value"] for e in container(deploy)["env"] if e["name"] == "MLJOB_LEASE_NAME")
    assert lease_name == fullname

    kubectl.run("-n", namespace, "create", "-f", "-", stdin=json.dumps(lease_body("someone-else")))
    token = kubectl.run("-n", namespace, "create", "token", fullname, "--duration=1h").stdout.strip()
    kube = Kube(kube_config.new_client_from_config(config_file=kubectl._token_kubeconfig(token)), threads=2)
    try:
        record = LeaseRecord("replica-a", 15, None, None, 0)
        created = await kube.create_lease(namespace, lease_name, record, 10)
        got = await kube.get_lease(namespace, lease_name, 10)
        assert got is not None and got.record.holder == "replica-a"
        stamp = datetime.now(UTC)
        renewal = LeaseRecord("replica-a", 15, stamp, stamp, 0)
        renewed = await kube.replace_lease(namespace, lease_name, renewal, created.resource_version, 10)
        assert renewed.resource_version != created.resource_version
        assert renewed.record.renew_time == stamp  # a MicroTime, to the microsecond
        for refused in (
            kube.get_lease(namespace, "someone-else", 10),
            kube.replace_lease(namespace, "someone-else", record, "1", 10),
            kube.create_lease("default", lease_name, record, 10),
        ):
            with pytest.raises(ApiException) as err:
                await refused
            assert err.value.status == 403
    finally:
        kube.close()


def lease_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": "another-operator", "leaseDurationSeconds": 15},
    }


def test_values_yaml_documents_every_top_level_key_of_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


def test_worker_example_passes_a_server_side_dry_run(
    kubectl: Kubectl, foreign_crds: None, namespace: str
) -> None:
    example = CHART.parents[1] / "examples" / "worker-deployment.yaml"
    kinds = [d["kind"] for d in docs(example.read_text())]
    assert kinds == ["Deployment", "ScaledObject"]
    proc = kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", str(example), check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == 2
