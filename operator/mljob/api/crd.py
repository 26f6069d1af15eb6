"""Render the MLJob CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema; Kubernetes wants a structural OpenAPI v3 schema (no $ref, no
anyOf over types, no null). This module converts one into the other and adds the CRD
envelope, printer columns and the status subresource.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from mljob.api import models
from mljob.core import phases

_DROP_KEYS = {"title"}
_OVERRIDE_KEY = "x-mljob-schema"
_RULES = "x-kubernetes-validations"


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if _OVERRIDE_KEY in node:
        return copy.deepcopy(node[_OVERRIDE_KEY])
    node = dict(node)
    while "$ref" in node or "anyOf" in node:
        if "$ref" in node:
            target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
            rules = target.get(_RULES, []) + node.get(_RULES, [])
            node = {**target, **node}
            if rules:
                node[_RULES] = rules
        if "anyOf" in node:  # Optional[X] -> X; Kubernetes expresses "absent" by omission.
            options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express a union in a structural schema: {options}")
            node = {**options[0], **node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "default" and value is None:
            continue
        if key == "properties":
            out[key] = {name: _resolve(prop, defs) for name, prop in value.items()}
        elif key == "additionalProperties":
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif value is not False:
                out[key] = _resolve(value, defs)
        else:
            out[key] = _resolve(value, defs)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    result: dict[str, Any] = _resolve(raw, defs)
    return result


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Processed", "type": "integer", "jsonPath": ".status.processed"},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.failed"},
    {"name": "Total", "type": "integer", "jsonPath": ".status.total"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Pipeline", "type": "string", "jsonPath": ".spec.pipeline", "priority": 1},
]


def render() -> dict[str, Any]:
    """The complete CRD as a dict."""
    spec_schema = structural_schema(models.MLJobSpec)
    status_schema = structural_schema(models.MLJobStatus)
    phase_rule = {"message": phases.CEL_TRANSITION_MESSAGE, "rule": phases.cel_transition_rule()}
    status_schema[_RULES] = [phase_rule, *status_schema.get(_RULES, [])]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{models.PLURAL}.{models.GROUP}"},
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": models.SHORT_NAMES,
                "categories": ["all", "mljob"],
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An ML batch job: one task per item, fanned out to the "
                            "workers of a pipeline.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


POLICY_NAME = "mljob-spec-rules"


def render_policy() -> list[dict[str, Any]]:
    """Rules the CRD schema cannot hold: `items` and `params` are schemaless, so CEL in the CRD
    cannot see them. A ValidatingAdmissionPolicy types them dynamically and can."""
    match = {
        "resourceRules": [
            {
                "apiGroups": [models.GROUP],
                "apiVersions": [models.VERSION],
                "operations": ["CREATE", "UPDATE"],
                "resources": [models.PLURAL],
            }
        ]
    }
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": POLICY_NAME},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": match,
                "validations": [
                    {
                        "expression": "has(object.spec.items) != has(object.spec.itemsFrom)",
                        "message": models.EXACTLY_ONE_SOURCE_MESSAGE,
                        "reason": "Invalid",
                    },
                    {
                        "expression": "request.operation != 'UPDATE' || "
                        "(object.spec.?items == oldObject.spec.?items && "
                        "object.spec.?params == oldObject.spec.?params)",
                        "message": "spec.items and spec.params: " + models.IMMUTABLE_MESSAGE,
                        "reason": "Invalid",
                    },
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": POLICY_NAME},
            "spec": {"policyName": POLICY_NAME, "validationActions": ["Deny"]},
        },
    ]


HEADER = "# Generated by `mljob crd` from operator/mljob/api/models.py. Do not edit by hand.\n"


def render_yaml() -> str:
    return HEADER + yaml.safe_dump(render(), sort_keys=False, width=100)


def render_policy_yaml() -> str:
    return HEADER + yaml.safe_dump_all(render_policy(), sort_keys=False, width=100)


def render_chart_policy_yaml() -> str:
    """The chart's copy of the policy, behind `admissionPolicy.enabled`: the policy is cluster-scoped
    with a fixed name, so a second release (or a cluster that applied crds/ by hand) turns it off."""
    body = yaml.safe_dump_all(render_policy(), sort_keys=False, width=100)
    return HEADER + "{{- if .Values.admissionPolicy.enabled }}\n" + body + "{{- end }}\n"


def rendered_files(root: Path) -> dict[Path, str]:
    """Every generated file and its expected content."""
    crd, policy = render_yaml(), render_policy_yaml()
    chart = root / "charts" / "mljob-operator"
    return {
        root / "crds" / "mljob.yaml": crd,
        root / "crds" / "mljob-policy.yaml": policy,
        chart / "crds" / "mljob.yaml": crd,
        chart / "templates" / "validating-policy.yaml": render_chart_policy_yaml(),
    }


def write(root: Path) -> list[Path]:
    files = rendered_files(root)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
