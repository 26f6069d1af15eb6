"""The Dockerfile, read as text: a pinned slim base, a non-root user that matches the chart,
`mljob` as the entrypoint and present in the built wheel, nothing that needs a writable root
filesystem, and a .dockerignore that keeps the context small. The image built from it is
checked in tests/node/test_image_built.py (`make test-node`), the chart's pods on a node in
tests/node/test_chart_on_node.py."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from support.stack import ROOT

pytestmark = pytest.mark.unit

DOCKERFILE = ROOT / "Dockerfile"
CHART_VALUES = ROOT / "charts" / "mljob-operator" / "values.yaml"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def build_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest)


def test_every_stage_is_a_slim_python_pinned_to_a_patch_version() -> None:
    args = build_args()
    froms = [rest.split()[0] for word, rest in instructions() if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a final stage"
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+", image), (
            f"{image}: pin python:X.Y.Z-slim-<debian>"
        )
        assert "latest" not in image


def test_the_wheel_is_built_first_and_the_final_stage_installs_it_with_the_operator_extra() -> None:
    build, final = stages()[0], stages()[-1]
    assert any(w == "RUN" and "pip wheel" in r for w, r in build)
    runs = " ".join(r for w, r in final if w == "RUN")
    assert "--no-index" in runs, "the final stage installs from the built wheels only"
    assert "mljob_operator-*.whl" in runs and "[operator]" in runs
    final_text = " ".join(r for _, r in final)
    for compiler in ("build-essential", "gcc", "g++", "make "):
        assert compiler not in final_text, f"{compiler} in the final image"
    assert not any(w in {"COPY", "ADD"} and "operator" in r.split() for w, r in final), "no source tree"


def test_final_user_is_non_root_and_matches_the_chart() -> None:
    final = stages()[-1]
    users = [r for w, r in final if w == "USER"]
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (runAsNonRoot can verify it)"
    assert f"--uid {uid}" in " ".join(r for w, r in final if w == "RUN")
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["securityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsNonRoot"] is True


def test_runs_on_a_read_only_root_filesystem() -> None:
    env = " ".join(r for w, r in stages()[-1] if w == "ENV")
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "HOME=/tmp", "TMPDIR=/tmp"):
        assert setting in env
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert values["securityContext"]["readOnlyRootFilesystem"] is True


def test_entrypoint_is_the_mljob_console_script_of_the_built_wheel(tmp_path: Path) -> None:
    entrypoints = [r for w, r in stages()[-1] if w == "ENTRYPOINT"]
    assert entrypoints == ['["mljob"]']
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("mljob_operator-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry_points).decode()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert re.search(r"^\[console_scripts\]\n(.+\n)*mljob = mljob\.cli\.main:main$", scripts, re.M), scripts
    assert "Provides-Extra: operator" in metadata
    # What the operator reads from its own package at run time is in the wheel.
    for sql in (ROOT / "operator" / "mljob" / "db" / "migrations").glob("*.sql"):
        assert f"mljob/db/migrations/{sql.name}" in names
    for static in (ROOT / "operator" / "mljob" / "httpapi" / "static").iterdir():  # the job pages'
        assert f"mljob/httpapi/static/{static.name}" in names
    # The development tools (local stack, demo, fault injection) are not shipped.
    shipped = {name.split("/", 1)[0] for name in names if name.endswith(".py")}
    assert shipped == {"mljob"}, shipped
    assert not [name for name in names if "devstack" in name or "chaos" in name or "demo" in name]


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", ".venv", "tests", "**/__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"):
        assert entry in ignored, entry
    for needed in ("pyproject.toml", "README.md", "operator"):
        assert needed not in ignored
