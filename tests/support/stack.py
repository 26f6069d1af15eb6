"""The local stack as tests see it: its addresses and identities (`StackEnv`), kubectl against
it (`Kubectl`), the repository's paths. The fixtures that make them are in tests/conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from support.harness import ROLE_VARS, ROOT, connect_nats, nats_identity

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

__all__ = ["CLUSTER_VARS", "CRD_DIR", "NATS_VARS", "ROOT", "SERVICE_VARS", "Kubectl", "StackEnv"]

CRD_DIR = ROOT / "crds"
SERVICE_VARS = ("KUBECONFIG", "MLJOB_NATS_URL", "MLJOB_REDIS_URL", "MLJOB_POSTGRES_DSN")
#: The stack's NATS settings besides the URL: the default (operator) identity, the CA, the
#: other roles' identities.
NATS_VARS = (
    "MLJOB_NATS_USER",
    "MLJOB_NATS_PASSWORD",
    "MLJOB_NATS_TLS_CA_FILE",
    *(v for pair in ROLE_VARS.values() for v in pair),
)
#: What a clustered stack (`mljob dev stack up --ha`) exports besides the addresses: every
#: process of a test runs with them, so it speaks to the cluster the way the stack's own do.
CLUSTER_VARS = (
    "MLJOB_REDIS_CLUSTER",
    "MLJOB_REDIS_CLUSTER_NODES",
    "MLJOB_STREAM_REPLICAS",
    "MLJOB_CONSUMER_REPLICAS",
    "MLJOB_NATS_MONITOR_URLS",
    "MLJOB_STACK_HA",
)


@dataclass(frozen=True)
class StackEnv:
    kubeconfig: str
    nats_url: str
    nats_monitor_url: str
    redis_url: str
    postgres_dsn: str
    directory: str
    #: NATS_VARS and the ROLE_VARS, as the stack exported them
    nats_vars: dict[str, str] = field(default_factory=dict)
    #: CLUSTER_VARS, as a clustered stack exported them (empty for the single-node stack)
    cluster_vars: dict[str, str] = field(default_factory=dict)

    @property
    def clustered(self) -> bool:
        return self.cluster_vars.get("MLJOB_STACK_HA") == "1"

    @classmethod
    def of(cls, env: dict[str, str]) -> StackEnv:
        """The stack whose environment (`mljob dev stack env`) is `env`."""
        return cls(
            kubeconfig=env["KUBECONFIG"],
            nats_url=env["MLJOB_NATS_URL"],
            nats_monitor_url=env.get("MLJOB_NATS_MONITOR_URL", ""),
            redis_url=env["MLJOB_REDIS_URL"],
            postgres_dsn=env["MLJOB_POSTGRES_DSN"],
            directory=env["MLJOB_STACK_DIR"],
            nats_vars={k: env[k] for k in NATS_VARS if env.get(k)},
            cluster_vars={k: env[k] for k in CLUSTER_VARS if env.get(k)},
        )

    def as_env(self, role: str = "operator") -> dict[str, str]:
        """The environment of a process of `role` (operator, collector or worker): the stack's
        addresses and that role's NATS identity."""
        return {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "MLJOB_REDIS_URL": self.redis_url,
            "MLJOB_POSTGRES_DSN": self.postgres_dsn,
            **self.nats_vars,
            **self.cluster_vars,
            **self.nats_identity(role),
        }

    def nats_identity(self, role: str = "operator") -> dict[str, str]:
        """The MLJOB_NATS_* variables a process of `role` runs with (operator, collector, worker)."""
        return nats_identity({"MLJOB_NATS_URL": self.nats_url, **self.nats_vars}, role)

    async def nats(self, role: str = "admin", **options: Any) -> NATS:
        """A NATS connection of `role` (default: the stack's admin, for a test's own setup and
        inspection), with the stack's credentials and CA."""
        return await connect_nats({"MLJOB_NATS_URL": self.nats_url, **self.nats_vars}, role, **options)


class Kubectl:
    """kubectl against the test stack; returns CompletedProcess so tests can read stderr."""

    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        kubeconfig = self.kubeconfig if token is None else self._token_kubeconfig(token)
        cmd = ["kubectl", f"--kubeconfig={kubeconfig}", *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def _token_kubeconfig(self, token: str) -> str:
        """A kubeconfig that authenticates by bearer token only (no admin client certificate)."""
        config = json.loads(Path(self.kubeconfig).read_text())
        config["users"] = [{"name": "mljob-admin", "user": {"token": token}}]
        path = Path(self.kubeconfig).with_name(f"kubeconfig-token-{uuid.uuid4().hex[:8]}")
        path.write_text(json.dumps(config))
        return str(path)

    def json(self, *args: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.run(*args, "-o", "json").stdout)  # type: ignore[no-any-return]
