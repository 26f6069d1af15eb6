"""Real processes for end-to-end tests: the operator and workers, with logs kept for failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from mljob_dev.devstack import nats_config
from support.waiting import wait_for as wait_for  # re-exported: the one helper is there

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"Succeeded", "Failed", "Cancelled"}


class Proc:
    """A child process with its log file; stopped (and reaped) by `stop`."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.alive():
            self.send(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


#: A stack's other NATS identities' variables (the admin, with every right, is for a test's own
#: setup and inspection, never for a process under test).
ROLE_VARS = {
    role: (f"{prefix}_USER", f"{prefix}_PASSWORD") for role, (_, prefix) in nats_config.ROLE_VARIABLES.items()
}
#: The MLJOB_NATS_* variables a process of a role runs with, from a stack's environment.
nats_identity = nats_config.role_env


async def connect_nats(env: dict[str, str], role: str = "admin", **options: Any) -> Any:
    """A NATS connection as `role`, with the credentials and CA of the stack `env` describes."""
    import nats

    from mljob.settings import NatsSettings
    from mljob.transport import natsconn

    settings = NatsSettings.model_validate(
        {k.removeprefix("MLJOB_").lower(): v for k, v in nats_identity(env, role).items()}
    )
    kwargs = natsconn.options(settings, name=f"test-{role}")
    kwargs.update(options)
    return await nats.connect(**kwargs)


def mljob_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mljob.cli.main", *args]


def child_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def mljob_manifest(name: str, pipeline: str, items: list[Any] | None = None, **spec: Any) -> str:
    body: dict[str, Any] = {
        "apiVersion": "mljob.dev/v1alpha1",
        "kind": "MLJob",
        "metadata": {"name": name},
        "spec": {"pipeline": pipeline, **spec},
    }
    if items is not None:
        body["spec"]["items"] = items
    return json.dumps(body)
