"""A command's peak memory: it runs under a small Python parent whose only child it is, so
`RUSAGE_CHILDREN`'s maxrss is that command's own (the test process has had bigger children)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_PARENT = """
import json, resource, subprocess, sys
report, cmd = sys.argv[1], sys.argv[2:]
code = subprocess.call(cmd)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(report, "w") as out:
    json.dump({"code": code, "maxrss_kb": peak}, out)
"""


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float


def run_measured(
    cmd: list[str], env: dict[str, str], stdout: Path | None = None, timeout: float = 300
) -> Measured:
    """Run `cmd` (its stdout to `stdout` when given, else captured) and measure its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        full = [sys.executable, "-c", _PARENT, str(report), *cmd]
        if stdout is not None:
            with open(stdout, "wb") as sink:
                proc = subprocess.run(full, env=env, stdout=sink, stderr=subprocess.PIPE, timeout=timeout)
            out = ""
        else:
            proc = subprocess.run(full, env=env, capture_output=True, timeout=timeout)
            out = proc.stdout.decode(errors="replace")
        data = json.loads(report.read_text())
    return Measured(int(data["code"]), out, proc.stderr.decode(errors="replace"), data["maxrss_kb"] / 1024)
