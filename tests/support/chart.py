"""Helm against the chart: render, install and read back; used by the chart and RBAC tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from mljob_dev.devstack import tools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mljob-operator"


def helm(*args: str, kubeconfig: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the cached helm build; with `kubeconfig` it talks to that cluster."""
    cmd = [str(tools.ensure("helm")), *args]
    if kubeconfig:
        cmd.insert(1, f"--kubeconfig={kubeconfig}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_args(values: dict[str, Any]) -> list[str]:
    """`--set-json` flags, one per top-level value: exact types, no escaping rules of --set."""
    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def schema_refusal(values: dict[str, Any]) -> str:
    """`helm template` with `values`, which the chart's schema must refuse: helm's error text."""
    proc = helm("template", "rel", str(CHART), *set_args(values), check=False)
    assert proc.returncode != 0, f"accepted: {values}"
    assert "values don't meet the specifications of the schema" in proc.stderr
    return proc.stderr


def render(values: dict[str, Any] | None = None, *extra: str, namespace: str = "mljob") -> str:
    return helm(
        "template", "rel", str(CHART), "--namespace", namespace, *set_args(values or {}), *extra
    ).stdout


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment).get("env", [])}


def minimal_crd(
    group: str, version: str, kind: str, plural: str, scope: str = "Namespaced"
) -> dict[str, Any]:
    """A schemaless stand-in for the CRD of an operator this stack does not run (Prometheus, KEDA):
    enough for the apiserver to accept and dry-run the chart's objects of that kind."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }


FOREIGN_CRDS = [
    minimal_crd("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors"),
    minimal_crd("monitoring.coreos.com", "v1", "PrometheusRule", "prometheusrules"),
    minimal_crd("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects"),
]
