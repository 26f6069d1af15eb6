"""The local control plane is a real kube-apiserver with RBAC and service-account tokens."""

from __future__ import annotations

import json

from mljob_dev.devstack import tools
from support.stack import Kubectl
from support.waiting import wait_for


def test_kubectl_version_reports_the_real_server_version(kubectl: Kubectl) -> None:
    out = json.loads(kubectl.run("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == tools.KUBERNETES_VERSION
    assert out["serverVersion"]["minor"] == tools.KUBERNETES_VERSION.split(".")[1]


def test_rbac_refuses_a_service_account_without_permissions(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("-n", namespace, "create", "serviceaccount", "nobody")
    token = kubectl.run("-n", namespace, "create", "token", "nobody").stdout.strip()
    assert token.count(".") == 2, "expected a signed JWT from the TokenRequest API"

    refused = kubectl.run("-n", namespace, "get", "configmaps", token=token, check=False)
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr.lower()
    assert f"system:serviceaccount:{namespace}:nobody" in refused.stderr

    # The same token works once RBAC grants the verb: the refusal above was authorization.
    kubectl.run("-n", namespace, "create", "role", "cm-reader", "--verb=list", "--resource=configmaps")
    kubectl.run(
        "-n",
        namespace,
        "create",
        "rolebinding",
        "cm-reader",
        "--role=cm-reader",
        f"--serviceaccount={namespace}:nobody",
    )
    wait_for(
        lambda: kubectl.run("-n", namespace, "get", "configmaps", token=token, check=False).returncode == 0,
        30,
        what="the RoleBinding to let the same token in",
    )
