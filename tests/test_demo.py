"""`make demo` keeps working: run its script on a small job (it starts and stops its own stack)."""

from __future__ import annotations

import os
import subprocess

from conftest import ROOT


def test_demo_script_runs_the_main_job_to_a_verdict_shown_in_both_stores() -> None:
    env = {**os.environ, "DEMO_ITEMS": "120", "DEMO_LATENCY_SECONDS": "0.001"}
    for var in ("KUBECONFIG", "MLJOB_STACK_DIR"):
        env.pop(var, None)
    proc = subprocess.run(
        [str(ROOT / "scripts" / "demo")], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "demo-classify   Succeeded   100%       120" in out, out
    assert "| Succeeded | CompletedWithFailures |   120 |       120 |" in out, out
