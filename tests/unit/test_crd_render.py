"""The committed CRD and admission policy are exactly what `mljob crd` renders from the models."""

from __future__ import annotations

import pytest

from mljob.api import crd, models
from mljob.cli.main import main
from support.stack import ROOT

pytestmark = pytest.mark.unit


def test_committed_files_equal_the_rendering() -> None:
    for path, text in crd.rendered_files(ROOT).items():
        assert path.read_text() == text, f"{path} is stale: run `mljob crd`"
    assert main(["crd", "--check", "--root", str(ROOT)]) == 0


def test_check_fails_on_a_stale_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    crd.write(tmp_path)
    assert main(["crd", "--check", "--root", str(tmp_path)]) == 0
    (tmp_path / "crds" / "mljob.yaml").write_text("stale\n")
    assert main(["crd", "--check", "--root", str(tmp_path)]) == 1


def test_schema_is_structural() -> None:
    schema = crd.render()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for banned in ("$ref", "anyOf", "$defs", "title"):
                assert banned not in node, f"{banned} at {path}"
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(schema, "")
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["pipeline"]
    assert spec["properties"]["failureThreshold"]["default"] == 0.5
    assert spec["properties"]["maxDeliver"]["default"] == 2
    assert spec["properties"]["ackWaitSeconds"]["default"] == 60
    assert spec["properties"]["stallTimeoutSeconds"]["default"] == 600
    status = schema["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == [p.value for p in models.Phase]
    assert status["diagnostics"]["maxItems"] == models.MAX_DIAGNOSTICS


def test_models_parse_what_the_examples_hold() -> None:
    import yaml

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == "MLJob":
                spec = models.MLJobSpec.model_validate(doc["spec"])
                assert spec.pipeline == doc["spec"]["pipeline"]
