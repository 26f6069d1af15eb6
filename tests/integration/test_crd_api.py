"""The MLJob API as the API server enforces it: schema, CEL rules, admission policy, columns."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from mljob.api.models import Phase
from mljob.core.phases import can_transition
from support.stack import ROOT, Kubectl, StackEnv
from support.waiting import wait_for

EXAMPLES = ROOT / "examples"
VALID = sorted(EXAMPLES.glob("mljob-*.yaml"))  # worker-deployment.yaml is tested with the chart
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("crd_installed")


def _expected_fragment(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message fragment>'"
    return first.removeprefix("# expect: ").strip()


def _job(name: str, **spec: object) -> str:
    body = {
        "apiVersion": "mljob.dev/v1alpha1",
        "kind": "MLJob",
        "metadata": {"name": name},
        "spec": {"pipeline": "demo", "items": ["a", "b", "c"], **spec},
    }
    return json.dumps(body)


def test_examples_exist() -> None:
    assert len(VALID) >= 4
    assert len(INVALID) >= 10


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_example_applies(kubectl: Kubectl, namespace: str, path: Path) -> None:
    kubectl.run("-n", namespace, "apply", "-f", str(path))
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] == "MLJob":
            got = kubectl.json("-n", namespace, "get", "mljob", doc["metadata"]["name"])
            assert got["spec"]["pipeline"] == doc["spec"]["pipeline"]
            assert got["spec"]["failureThreshold"] == doc["spec"].get("failureThreshold", 0.5)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_is_refused_with_a_message_naming_the_field(
    kubectl: Kubectl, namespace: str, path: Path
) -> None:
    fragment = _expected_fragment(path)

    def refused_with_message() -> bool:
        proc = kubectl.run("-n", namespace, "create", "-f", str(path), check=False)
        if proc.returncode == 0:  # an admission policy not yet in force: undo and retry
            kubectl.run("-n", namespace, "delete", "-f", str(path), "--wait=false", check=False)
            return False
        assert "invalid" in proc.stderr.lower() or "denied" in proc.stderr.lower(), proc.stderr
        assert fragment in proc.stderr, proc.stderr
        return True

    wait_for(refused_with_message, 30, what=f"{path.name} to be refused")


def _write_status(
    kubectl: Kubectl, namespace: str, name: str, status: dict[str, object], check: bool = True
) -> subprocess.CompletedProcess[str]:
    return kubectl.run(
        "-n",
        namespace,
        "patch",
        "mljob",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
        check=check,
    )


def test_printer_columns_show_the_status(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("-n", namespace, "apply", "-f", "-", stdin=_job("columns"))
    _write_status(
        kubectl,
        namespace,
        "columns",
        {
            "phase": "Running",
            "progress": "87%",
            "processed": 87,
            "failed": 3,
            "total": 100,
        },
    )
    for resource in ("mljobs", "mlj"):
        out = kubectl.run("-n", namespace, "get", resource).stdout.splitlines()
        assert out[0].split() == ["NAME", "PHASE", "PROGRESS", "PROCESSED", "FAILED", "TOTAL", "AGE"]
        assert out[1].split()[:6] == ["columns", "Running", "87%", "87", "3", "100"]
    wide = kubectl.run("-n", namespace, "get", "mlj", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-1] == "PIPELINE"
    assert wide[1].split()[-1] == "demo"


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        ({"phase": "Succeeded"}, {"phase": "Running"}, "terminal phase"),
        ({"phase": "Failed"}, {"phase": "Succeeded"}, "terminal phase"),
        ({"phase": "Cancelled"}, {"phase": "Running"}, "terminal phase"),
        ({"phase": "Canceling"}, {"phase": "Succeeded"}, "Canceling can only become Cancelled"),
        ({"phase": "Running", "processed": 10}, {"processed": 9}, "status.processed never decreases"),
        ({"phase": "Running", "failed": 4}, {"failed": 1}, "status.failed never decreases"),
        (
            {"phase": "Succeeded", "completionTime": "2026-01-01T00:00:00Z"},
            {"completionTime": "2026-01-02T00:00:00Z"},
            "completionTime never changes",
        ),
    ],
)
def test_status_guard_is_enforced_by_the_apiserver(
    kubectl: Kubectl, namespace: str, before: dict[str, object], after: dict[str, object], message: str
) -> None:
    kubectl.run("-n", namespace, "apply", "-f", "-", stdin=_job("guarded"))
    _write_status(kubectl, namespace, "guarded", before)
    proc = _write_status(kubectl, namespace, "guarded", after, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    status = kubectl.json("-n", namespace, "get", "mljob", "guarded")["status"]
    for key, value in before.items():
        assert status[key] == value


def test_the_apiserver_allows_exactly_the_phase_moves_of_the_table(
    stack: StackEnv, kubectl: Kubectl, namespace: str
) -> None:
    """Every (current, target) pair of phases, written to a real API server: it accepts a move
    if and only if `core.phases` allows it (the CRD's rule is generated from that table), so no
    writer, the operator or anyone else, can move a phase the table refuses (Running -> Pending,
    Dispatching -> Pending, Running -> Dispatching ...)."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.rest import ApiException
    from kubernetes.config import new_client_from_config

    api = CustomObjectsApi(new_client_from_config(config_file=stack.kubeconfig))
    where = ("mljob.dev", "v1alpha1", namespace, "mljobs")
    accepted: dict[tuple[Phase, Phase], bool] = {}
    refusals: list[str] = []
    for n, (current, target) in enumerate(itertools.product(Phase, Phase)):
        name = f"move-{n}"
        api.create_namespaced_custom_object(*where, json.loads(_job(name)))
        api.patch_namespaced_custom_object_status(*where, name, {"status": {"phase": current.value}})
        try:
            api.patch_namespaced_custom_object_status(*where, name, {"status": {"phase": target.value}})
            accepted[(current, target)] = True
        except ApiException as err:
            assert err.status == 422, err
            accepted[(current, target)] = False
            refusals.append(str(err.body))
    expected = {(current, target): can_transition(current, target) for current, target in accepted}
    assert accepted == expected, {pair: ok for pair, ok in accepted.items() if ok != expected[pair]}
    assert all("a move the phase table refuses" in body for body in refusals), refusals[:1]


def test_allowed_status_transitions_pass(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("-n", namespace, "apply", "-f", "-", stdin=_job("moves"))
    for step in (
        {"phase": "Pending"},
        {"phase": "Running", "processed": 1},
        {"phase": "Canceling"},
        {"phase": "Cancelled", "completionTime": "2026-01-01T00:00:00Z"},
    ):
        _write_status(kubectl, namespace, "moves", step)
    assert kubectl.json("-n", namespace, "get", "mljob", "moves")["status"]["phase"] == "Cancelled"


def test_json_patch_with_a_failing_test_op_is_refused(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("-n", namespace, "apply", "-f", "-", stdin=_job("cas"))
    _write_status(kubectl, namespace, "cas", {"phase": "Running"})
    stale = [
        {"op": "test", "path": "/status/phase", "value": "Pending"},
        {"op": "replace", "path": "/status/phase", "value": "Succeeded"},
    ]
    proc = kubectl.run(
        "-n",
        namespace,
        "patch",
        "mljob",
        "cas",
        "--subresource=status",
        "--type=json",
        "-p",
        json.dumps(stale),
        check=False,
    )
    assert proc.returncode != 0
    assert "invalid" in proc.stderr.lower(), proc.stderr  # 422: the test op did not match
    assert kubectl.json("-n", namespace, "get", "mljob", "cas")["status"]["phase"] == "Running"
    fresh = [
        {"op": "test", "path": "/status/phase", "value": "Running"},
        {"op": "replace", "path": "/status/phase", "value": "Succeeded"},
    ]
    kubectl.run(
        "-n",
        namespace,
        "patch",
        "mljob",
        "cas",
        "--subresource=status",
        "--type=json",
        "-p",
        json.dumps(fresh),
    )
    assert kubectl.json("-n", namespace, "get", "mljob", "cas")["status"]["phase"] == "Succeeded"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"pipeline": "other"}, "spec.pipeline: spec is immutable"),
        ({"maxDeliver": 5}, "spec.maxDeliver: spec is immutable"),
        ({"failureThreshold": 0.9}, "spec.failureThreshold: spec is immutable"),
        ({"activeDeadlineSeconds": 60}, "spec is immutable"),
        ({"items": ["a", "b", "c", "d"]}, "spec.items and spec.params"),
        ({"params": {"size": 1}}, "spec.items and spec.params"),
    ],
)
def test_spec_is_immutable(kubectl: Kubectl, namespace: str, patch: dict[str, object], message: str) -> None:
    kubectl.run("-n", namespace, "apply", "-f", "-", stdin=_job("frozen"))

    def refused() -> bool:
        proc = kubectl.run(
            "-n",
            namespace,
            "patch",
            "mljob",
            "frozen",
            "--type=merge",
            "-p",
            json.dumps({"spec": patch}),
            check=False,
        )
        if proc.returncode == 0:  # the admission policy was not in force yet: restore and retry
            kubectl.run("-n", namespace, "replace", "--force", "-f", "-", stdin=_job("frozen"))
            return False
        assert message in proc.stderr, proc.stderr
        return True

    wait_for(refused, 30, what=f"the change {patch} to be refused")


def test_cancel_and_ttl_may_change_but_cancel_never_goes_back(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("-n", namespace, "apply", "-f", "-", stdin=_job("cancellable"))
    kubectl.run(
        "-n",
        namespace,
        "patch",
        "mljob",
        "cancellable",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"cancel": True, "ttlSecondsAfterFinished": 30}}),
    )
    proc = kubectl.run(
        "-n",
        namespace,
        "patch",
        "mljob",
        "cancellable",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"cancel": False}}),
        check=False,
    )
    assert proc.returncode != 0
    assert "spec.cancel cannot go back from true to false" in proc.stderr, proc.stderr
    spec = kubectl.json("-n", namespace, "get", "mljob", "cancellable")["spec"]
    assert spec["cancel"] is True
    assert spec["ttlSecondsAfterFinished"] == 30
