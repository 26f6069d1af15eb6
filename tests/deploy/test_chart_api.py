"""The chart's read-only API (`api.enabled`): off by default; when on, a Deployment running
`mljob api`, its Service, a ServiceAccount of its own and least-privilege RBAC (create the two
reviews, get/list MLJobs, nothing else), values the schema checks; accepted by the apiserver,
and installed, its ServiceAccount may do exactly that."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

from mljob import settings as mljob_settings
from support.chart import CHART, container, docs, env_of, find, helm, one, render, schema_refusal, set_args
from support.stack import Kubectl, StackEnv

ON = {"api": {"enabled": True}}
REVIEWS = [
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
]
READ_JOBS = {"apiGroups": ["mljob.dev"], "resources": ["mljobs"], "verbs": ["get", "list"]}


def _notes(values: dict[str, Any]) -> str:
    """The install notes, as `helm install` prints them (a client dry run: nothing is created;
    the stack's admission policy, applied from crds/, is left out so helm does not claim it)."""
    values = {**values, "admissionPolicy": {"enabled": False}}
    return helm("install", "rel", str(CHART), "--dry-run=client", "-n", "mljob", *set_args(values)).stdout


def _api_objects(objs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(o["kind"], o["metadata"]["name"]) for o in objs if o["metadata"]["name"].endswith("-api")]


def test_off_by_default() -> None:
    assert _api_objects(docs(render())) == []
    assert "Read-only API" not in _notes({})


def test_enabled_runs_mljob_api_behind_a_service_on_its_own_service_account() -> None:
    objs = docs(render({"api": {"enabled": True, "port": 8181, "reviewCacheSeconds": 30}}))
    assert sorted(_api_objects(objs)) == [
        ("ClusterRole", "mljob-rel-mljob-operator-api"),
        ("ClusterRoleBinding", "mljob-rel-mljob-operator-api"),
        ("Deployment", "rel-mljob-operator-api"),
        ("Service", "rel-mljob-operator-api"),
        ("ServiceAccount", "rel-mljob-operator-api"),
    ]
    deploy = one(objs, "Deployment", "rel-mljob-operator-api")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "rel-mljob-operator-api"
    main = container(deploy)
    assert main["args"] == ["api"]
    assert main["ports"] == [{"name": "http", "containerPort": 8181, "protocol": "TCP"}]
    assert (main["livenessProbe"]["httpGet"], main["readinessProbe"]["httpGet"]) == (
        {"path": "/healthz", "port": "http"},
        {"path": "/readyz", "port": "http"},
    )
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    env = env_of(deploy)
    assert (env["MLJOB_API_PORT"], env["MLJOB_API_REVIEW_CACHE_SECONDS"]) == ("8181", "30")
    assert {"MLJOB_NATS_URL", "MLJOB_REDIS_URL", "MLJOB_POSTGRES_DSN", "MLJOB_REDIS_PREFIX"} <= set(env)
    service = one(objs, "Service", "rel-mljob-operator-api")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    role = one(objs, "ClusterRole", "mljob-rel-mljob-operator-api")
    assert role["rules"] == [*REVIEWS, READ_JOBS]
    binding = one(objs, "ClusterRoleBinding", "mljob-rel-mljob-operator-api")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-mljob-operator-api", "namespace": "mljob"}
    ]
    # The operator keeps its own account: the API holds none of its write rights.
    assert container(one(objs, "Deployment", "rel-mljob-operator"))["name"] == "operator"


def test_watch_namespaces_limit_its_mljob_reads_to_them() -> None:
    objs = docs(render({**ON, "watchNamespaces": ["team-a", "team-b"]}))
    assert one(objs, "ClusterRole", "mljob-rel-mljob-operator-api")["rules"] == REVIEWS
    roles = [o for o in find(objs, "Role", "rel-mljob-operator-api")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == [READ_JOBS] for r in roles)
    bindings = find(objs, "RoleBinding", "rel-mljob-operator-api")
    assert {b["subjects"][0]["name"] for b in bindings} == {"rel-mljob-operator-api"}


def test_its_nats_identity_and_stores_come_from_secrets() -> None:
    values = {
        **ON,
        "nats": {"credentials": {"api": {"userSecret": {"name": "nats-api"}}}},
        "postgres": {"dsn": "", "existingSecret": {"name": "conn", "key": "dsn"}},
    }
    env = env_of(one(docs(render(values)), "Deployment", "rel-mljob-operator-api"))
    assert env["MLJOB_NATS_USER"] == {"secretKeyRef": {"name": "nats-api", "key": "user"}}
    assert env["MLJOB_POSTGRES_DSN"] == {"secretKeyRef": {"name": "conn", "key": "dsn"}}
    notes = _notes(ON)
    assert "Read-only API: service rel-mljob-operator-api" in notes
    assert "no NATS credentials for: operator, api" in notes


def test_rendered_variables_parse_as_mljob_api_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith(mljob_settings.PREFIX)]:
        monkeypatch.delenv(name)
    deploy = one(docs(render({**ON, "redis": {"prefix": "team"}})), "Deployment", "rel-mljob-operator-api")
    for name, value in env_of(deploy).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    loaded = mljob_settings.load(mljob_settings.ApiSettings)
    assert (loaded.api_port, loaded.api_review_cache_seconds, loaded.redis_prefix) == (8080, 10, "team")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"api": {"enabled": "yes"}}, "at '/api/enabled': got string, want boolean"),
        ({"api": {"port": 0}}, "at '/api/port': minimum: got 0, want 1"),
        ({"api": {"reviewCacheSeconds": -1}}, "at '/api/reviewCacheSeconds': minimum: got -1, want 0"),
        ({"api": {"service": {"type": "Ingress"}}}, "at '/api/service/type'"),
        ({"api": {"replica": 2}}, "additional properties 'replica' not allowed"),
    ],
)
def test_schema_refuses_wrong_api_values(values: dict[str, Any], message: str) -> None:
    assert message in schema_refusal(values)


def test_installed_its_service_account_may_review_and_read_mljobs_and_nothing_else(
    stack: StackEnv, kubectl: Kubectl, crd_installed: None, namespace: str
) -> None:
    release = f"a{uuid.uuid4().hex[:6]}"
    values = {**ON, "admissionPolicy": {"enabled": False}}
    proc = kubectl.run(
        "apply", "--dry-run=server", "-f", "-", stdin=render(values, namespace=namespace), check=False
    )
    assert proc.returncode == 0, proc.stderr
    helm("install", release, str(CHART), "-n", namespace, *set_args(values), kubeconfig=stack.kubeconfig)
    try:
        who = f"system:serviceaccount:{namespace}:{release}-mljob-operator-api"

        def can(*args: str) -> bool:
            answer = kubectl.run("auth", "can-i", *args, f"--as={who}", check=False).stdout.strip()
            return answer == "yes"

        assert can("create", "tokenreviews.authentication.k8s.io")
        assert can("create", "subjectaccessreviews.authorization.k8s.io")
        assert can("get", "mljobs.mljob.dev", "-n", "elsewhere")
        assert can("list", "mljobs.mljob.dev", "-n", namespace)
        for refused in (
            ("patch", "mljobs.mljob.dev"),
            ("delete", "mljobs.mljob.dev"),
            ("patch", "mljobs.mljob.dev/status"),
            ("watch", "mljobs.mljob.dev"),
            ("get", "secrets"),
            ("get", "configmaps"),
            ("create", "serviceaccounts/token"),
            ("create", "events"),
        ):
            assert not can(*refused, "-n", namespace), refused
    finally:
        helm("uninstall", release, "-n", namespace, kubeconfig=stack.kubeconfig, check=False)
