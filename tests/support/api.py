"""The read-only API (`mljob api`) for end-to-end tests: the chart installed with `api.enabled`
(for its ServiceAccount and exactly its RBAC), `mljob api` run as a process on a token of that
account on a loopback port, and callers as ServiceAccounts with Roles of their own, whose tokens
come from the TokenRequest API (`kubectl create token`). Used by test_e2e_api.py (the API) and
test_e2e_client.py (the client and `kubectl mljob` on it)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from mljob_dev.devstack.stack import free_port
from support.chart import CHART, helm, set_args
from support.env import E2E
from support.harness import Proc, mljob_cmd
from support.stack import Kubectl
from support.waiting import wait_for

#: A Role's rules: (apiGroups, resources, verbs) each.
Rules = list[tuple[list[str], list[str], list[str]]]
MLJOBS = ["mljob.dev"]


def api_service_account(release: str) -> str:
    """The chart's ServiceAccount (and Service) of the API for a release."""
    return f"{release}-mljob-operator-api"


def rbac_manifest(grants: list[tuple[str, str, Rules]]) -> str:
    """A List of, per (namespace, account, rules): the ServiceAccount and, when it has rules, a
    Role of that name with them and its RoleBinding (no rules: an account that may do nothing)."""
    items: list[dict[str, Any]] = []
    for namespace, name, rules in grants:
        items.append(
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}
        )
        if not rules:
            continue
        meta = {"name": name, "namespace": namespace}
        items.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": meta,
                "rules": [{"apiGroups": g, "resources": r, "verbs": v} for g, r, v in rules],
            }
        )
        items.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": meta,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            }
        )
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def token(kubectl: Kubectl, namespace: str, account: str) -> str:
    return kubectl.run("-n", namespace, "create", "token", account, "--duration=1h").stdout.strip()


@dataclass
class ServedApi:
    """A running `mljob api`: its base URL and process."""

    base: str
    proc: Proc
    release: str

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/readyz", timeout=5) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False


@contextmanager
def read_only_api(e2e: E2E, kubectl: Kubectl, release: str = "api") -> Iterator[ServedApi]:
    """The chart with `api.enabled` in the test's namespace (watching it only), and `mljob api`
    on its ServiceAccount's token; uninstalled afterwards."""
    namespace = e2e.namespace
    values = {"watchNamespaces": [namespace], "admissionPolicy": {"enabled": False}, "api": {"enabled": True}}
    helm("install", release, str(CHART), "-n", namespace, *set_args(values), kubeconfig=e2e.stack.kubeconfig)
    try:
        api_kubeconfig = kubectl._token_kubeconfig(token(kubectl, namespace, api_service_account(release)))
        port = free_port()
        proc = Proc(
            "api",
            mljob_cmd("api", "--host", "127.0.0.1", "--port", str(port)),
            {**e2e.env_of("api"), "KUBECONFIG": api_kubeconfig},
            e2e.log_dir,
        )
        e2e.procs.append(proc)
        served = ServedApi(f"http://127.0.0.1:{port}", proc, release)

        def ready() -> bool:
            if not proc.alive():
                pytest.fail(f"mljob api exited:\n{proc.log_tail()}")
            return served.ready()

        wait_for(ready, 60, what=lambda: f"mljob api to be ready\n{proc.log_tail()}")
        yield served
    finally:
        helm("uninstall", release, "-n", namespace, kubeconfig=e2e.stack.kubeconfig, check=False)
