"""A worker-only install: `pip install mljob-operator` (no extra) into a fresh venv.

SLOW (about a minute, one venv): builds the package from this checkout and installs it with pip's
normal index access. The worker must import and run its CLI with only nats-py and pydantic;
the operator's dependencies must be absent, and the operator's subcommand must name its extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from support.stack import ROOT

pytestmark = pytest.mark.install
SKIP = (".git", ".venv", ".stack", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def run(cmd: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_worker_only_install(tmp_path: Path) -> None:
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python, mljob = str(target / "bin" / "python"), str(target / "bin" / "mljob")
    # A copy of the checkout: pip builds in the source tree, and a stale build/ there could hide
    # a missing file (or ship a deleted one).
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*SKIP))
    installed = run([python, "-m", "pip", "install", "-q", str(source)], tmp_path, timeout=540)
    assert installed.returncode == 0, installed.stderr[-3000:]

    imported = run(
        [
            python,
            "-c",
            "import mljob.worker, mljob.worker.examples, mljob.settings, mljob.transport.natsconn",
        ],
        tmp_path,
    )
    assert imported.returncode == 0, imported.stderr
    helped = run([mljob, "worker", "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "--pipeline" in helped.stdout

    for module in ("kopf", "kubernetes", "redis", "psycopg", "yaml", "cryptography"):
        absent = run([python, "-c", f"import {module}"], tmp_path)
        assert absent.returncode != 0, f"{module} is installed on a worker-only install"
        assert "ModuleNotFoundError" in absent.stderr, absent.stderr

    refused = run([mljob, "operator"], tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (
        refused.stderr.strip()
        == "mljob operator needs the operator extra: pip install 'mljob-operator[operator]'"
    )
    client = run([mljob, "status", "some-job"], tmp_path)
    assert client.returncode == 2, client.stdout + client.stderr
    assert (
        client.stderr.strip() == "mljob status needs the client extra: pip install 'mljob-operator[client]'"
    )
    plugin = run([str(target / "bin" / "kubectl-mljob"), "status", "some-job"], tmp_path)
    assert plugin.returncode == 2, plugin.stdout + plugin.stderr
    assert "kubectl mljob needs the client extra" in plugin.stderr
    stack = run([mljob, "dev", "stack", "up"], tmp_path)
    assert stack.returncode == 2, stack.stdout + stack.stderr
    assert "needs the devstack extra" in stack.stderr
    assert "Traceback" not in refused.stderr + stack.stderr + client.stderr + plugin.stderr
    assert sys.executable != python  # the checks above ran in the fresh venv, not this one
