"""RBAC proof: the operator runs on a token of the chart's ServiceAccount (not the admin
certificate) and completes, cancels and deletes MLJobs; without one verb of the chart's Role it
cannot, and `helm upgrade` (which restores the Role) lets the same job finish."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.chart import CHART, helm, set_args
from support.env import E2E, make_e2e
from support.stack import Kubectl, StackEnv
from support.waiting import wait_for

RELEASE = "rbac"
SERVICE_ACCOUNT = f"{RELEASE}-mljob-operator"


class ChartE2E:
    """An E2E namespace with the chart installed in it (RBAC for that namespace only) and a
    kubeconfig that authenticates as the chart's ServiceAccount."""

    def __init__(self, env: E2E, kubeconfig: str, token: str) -> None:
        self.env = env
        self.kubeconfig = kubeconfig
        self.token = token

    def operator_log(self) -> str:
        assert self.env.operator is not None
        return self.env.operator.log_path.read_text(errors="replace")

    def upgrade(self) -> None:
        helm(
            "upgrade",
            RELEASE,
            str(CHART),
            "-n",
            self.env.namespace,
            *set_args(values(self.env.namespace)),
            kubeconfig=self.env.stack.kubeconfig,
        )


def values(namespace: str) -> dict[str, Any]:
    # The stack's admission policy was applied from crds/, not by Helm: leave it to that.
    return {"watchNamespaces": [namespace], "admissionPolicy": {"enabled": False}}


@pytest.fixture
def chart_e2e(stack: StackEnv, kubectl: Kubectl, crd_installed: None, tmp_path: Path) -> Iterator[ChartE2E]:
    env_iter = make_e2e(stack, kubectl, tmp_path)
    env = next(env_iter)
    helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        env.namespace,
        *set_args(values(env.namespace)),
        kubeconfig=stack.kubeconfig,
    )
    token = kubectl.run(
        "-n", env.namespace, "create", "token", SERVICE_ACCOUNT, "--duration=2h"
    ).stdout.strip()
    kubeconfig = kubectl._token_kubeconfig(token)
    config = json.loads(Path(kubeconfig).read_text())
    assert config["users"] == [{"name": "mljob-admin", "user": {"token": token}}], "no client certificate"
    yield ChartE2E(env, kubeconfig, token)
    try:
        next(env_iter, None)
    finally:
        helm("uninstall", RELEASE, "-n", env.namespace, kubeconfig=stack.kubeconfig, check=False)


def test_operator_on_the_service_account_token_completes_cancels_and_deletes(chart_e2e: ChartE2E) -> None:
    env, kubectl = chart_e2e.env, chart_e2e.env.kubectl
    assert isinstance(kubectl, Kubectl)
    whoami = kubectl.run("auth", "whoami", "-o", "json", token=chart_e2e.token)
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{env.namespace}:{SERVICE_ACCOUNT}"
    )
    env.start_operator(KUBECONFIG=chart_e2e.kubeconfig)
    env.start_worker("rbac", "quick")

    # Complete.
    uid = env.apply("done", "rbac", [f"item-{i}" for i in range(40)])
    status = env.wait_terminal("done", timeout=120)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 40, 0), env.logs()
    events = kubectl.json(
        "-n", env.namespace, "get", "events", "--field-selector", "involvedObject.name=done"
    )
    assert "Succeeded" in {e["reason"] for e in events["items"]}, (
        "the operator's Events (create) were refused"
    )

    # Cancel: a pipeline with no worker keeps the job Running until cancelled.
    env.apply("stop-me", "no-workers", ["a", "b", "c"])
    env.wait_phase("stop-me", {"Running"}, timeout=60)
    kubectl.run(
        "-n", env.namespace, "patch", "mljob", "stop-me", "--type=merge", "-p", '{"spec": {"cancel": true}}'
    )
    assert env.wait_terminal("stop-me", timeout=60)["phase"] == "Cancelled"

    # Delete: the operator cleans up and removes its finalizer (a patch of the MLJob).
    kubectl.run("-n", env.namespace, "delete", "mljob", "done", "--wait=false")

    def gone() -> bool:
        return kubectl.run("-n", env.namespace, "get", "mljob", "done", check=False).returncode != 0

    wait_for(gone, 60, what="the deleted MLJob's finalizer to be removed by the operator")
    assert env.redis_keys(uid) == []
    assert env.nats_leftovers(uid, "rbac") == {"consumer": False, "registry": False}

    log = chart_e2e.operator_log()
    assert "forbidden" not in log.lower() and "(403)" not in log, log[-4000:]
    assert "Not enough permissions" not in log, "kopf lacks a grant it asks for"


def test_without_patch_on_mljobs_status_the_job_never_leaves_pending(chart_e2e: ChartE2E) -> None:
    env, kubectl = chart_e2e.env, chart_e2e.env.kubectl
    assert isinstance(kubectl, Kubectl)
    role = kubectl.json("-n", env.namespace, "get", "role", SERVICE_ACCOUNT)
    index = next(i for i, r in enumerate(role["rules"]) if r["resources"] == ["mljobs/status"])
    assert role["rules"][index]["verbs"] == ["get", "patch"]
    patch = [{"op": "replace", "path": f"/rules/{index}/verbs", "value": ["get"]}]
    kubectl.run("-n", env.namespace, "patch", "role", SERVICE_ACCOUNT, "--type=json", "-p", json.dumps(patch))
    subject = f"system:serviceaccount:{env.namespace}:{SERVICE_ACCOUNT}"
    can_i = [
        "auth",
        "can-i",
        "patch",
        "mljobs.mljob.dev",
        "--subresource=status",
        "--as",
        subject,
        "-n",
        env.namespace,
    ]
    wait_for(
        lambda: kubectl.run(*can_i, check=False).stdout.strip() == "no", 30, what="the Role to lose the verb"
    )

    env.start_operator(KUBECONFIG=chart_e2e.kubeconfig)
    env.start_worker("rbac", "quick")
    env.apply("blocked", "rbac", [f"item-{i}" for i in range(10)])

    def refused() -> bool:
        return "forbidden" in chart_e2e.operator_log().lower()

    wait_for(refused, 60, what="the operator to be refused the status patch (403)")
    log = chart_e2e.operator_log()
    assert f'User \\"{subject}\\" cannot patch resource \\"mljobs/status\\"' in log, log[-4000:]
    assert env.status("blocked").get("phase") in (None, "Pending"), env.status("blocked")

    # Restoring the verb (helm upgrade puts the Role back as the chart has it) unblocks the same job.
    chart_e2e.upgrade()
    assert kubectl.run(*can_i).stdout.strip() == "yes"
    status = env.wait_terminal("blocked", timeout=120)
    assert (status["phase"], status["processed"]) == ("Succeeded", 10), env.logs()
